//! The one store type the server holds. A closed set on purpose: a blocking store runs on
//! Tokio's blocking threads, the PostgreSQL store is awaited directly, and neither needs a
//! boxed-future trait.

use std::sync::Arc;

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{BatchRecord, EventRow, Ingested, ReceiverStore, StoreError, StoreStats, StoredEvent};

#[derive(Clone)]
pub enum AnyStore {
    Blocking(Arc<dyn ReceiverStore>),
    Postgres(Arc<PgStore>),
}

impl AnyStore {
    /// The identity reported by the health endpoint. PostgreSQL reads it each time: another
    /// replica may have re-created a dropped schema, and with it the identity.
    pub async fn server_instance_id(&self) -> Result<String, StoreError> {
        match self {
            AnyStore::Blocking(store) => Ok(store.server_instance_id().to_string()),
            AnyStore::Postgres(store) => store.server_instance_id().await,
        }
    }

    /// See [`ReceiverStore::ingest`].
    pub async fn ingest(&self, record: BatchRecord, events: Vec<EventRow>) -> Result<Vec<Ingested>, StoreError> {
        match self {
            AnyStore::Blocking(store) => {
                blocking(store, move |store| {
                    let borrowed: Vec<_> = events.iter().map(EventRow::borrowed).collect();
                    store.ingest(&record, &borrowed)
                })
                .await
            }
            AnyStore::Postgres(store) => {
                // A task of its own, like the blocking store's thread: a client that hangs up
                // mid-request does not cancel a batch that may already be committing.
                let store = Arc::clone(store);
                tokio::spawn(async move { store.ingest(&record, &events).await })
                    .await
                    .map_err(|e| StoreError::Backend { context: "the storage task failed", source: Box::new(e) })?
            }
        }
    }

    /// See [`ReceiverStore::record_request`].
    pub async fn record_request(&self, record: BatchRecord) -> Result<(), StoreError> {
        match self {
            AnyStore::Blocking(store) => blocking(store, move |store| store.record_request(&record)).await,
            AnyStore::Postgres(store) => store.record_request(&record).await,
        }
    }

    /// See [`ReceiverStore::events_after`]; PostgreSQL returns settled events only.
    pub async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        match self {
            AnyStore::Blocking(store) => blocking(store, move |store| store.events_after(after, limit)).await,
            AnyStore::Postgres(store) => store.events_after(after, limit).await,
        }
    }

    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        match self {
            AnyStore::Blocking(store) => blocking(store, |store| store.stats()).await,
            AnyStore::Postgres(store) => store.stats().await,
        }
    }
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn ReceiverStore>,
    work: impl FnOnce(&dyn ReceiverStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|e| StoreError::Backend { context: "the storage thread failed", source: Box::new(e) })?
}

impl From<Arc<dyn ReceiverStore>> for AnyStore {
    fn from(store: Arc<dyn ReceiverStore>) -> Self {
        AnyStore::Blocking(store)
    }
}

impl From<Arc<SqliteStore>> for AnyStore {
    fn from(store: Arc<SqliteStore>) -> Self {
        AnyStore::Blocking(store)
    }
}

impl From<SqliteStore> for AnyStore {
    fn from(store: SqliteStore) -> Self {
        AnyStore::Blocking(Arc::new(store))
    }
}

impl From<PgStore> for AnyStore {
    fn from(store: PgStore) -> Self {
        AnyStore::Postgres(Arc::new(store))
    }
}

impl From<Arc<PgStore>> for AnyStore {
    fn from(store: Arc<PgStore>) -> Self {
        AnyStore::Postgres(store)
    }
}
