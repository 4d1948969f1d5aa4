//! Where a receiver keeps its events: `sqlite:PATH` or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
//!
//! The password never leaves this module in text form: [`PgLocation`] displays the URL with
//! `***` in its place, and its `Debug` is the same text.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// `--store` as given on the command line.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// Boxed: a driver configuration is large next to a path.
    Postgres(Box<PgLocation>),
}

/// A PostgreSQL database to connect to, with the password (from the URL or `PGPASSWORD`)
/// kept out of every rendering.
#[derive(Clone)]
pub struct PgLocation {
    config: tokio_postgres::Config,
    shown: String,
}

/// Why a `--store` value was refused; always the operator's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LocationError {
    pub message: String,
    pub hint: String,
}

impl StoreLocation {
    /// Parses `sqlite:PATH` or a `postgres://`/`postgresql://` URL. `pg_password` stands in for
    /// a password the URL lacks (the caller passes `PGPASSWORD`).
    pub fn parse(text: &str, pg_password: Option<&str>) -> Result<StoreLocation, LocationError> {
        if let Some(path) = text.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err(LocationError {
                    message: "--store sqlite: needs a path".into(),
                    hint: "write --store sqlite:./receiver.db (or --db ./receiver.db)".into(),
                });
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return PgLocation::parse(text, pg_password).map(|pg| StoreLocation::Postgres(Box::new(pg)));
        }
        Err(LocationError {
            message: format!("unsupported --store {:?}", redact_url(text)),
            hint: "use sqlite:PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DB".into(),
        })
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            StoreLocation::Postgres(pg) => pg.fmt(f),
        }
    }
}

impl PgLocation {
    pub fn parse(url: &str, pg_password: Option<&str>) -> Result<PgLocation, LocationError> {
        let shown = redact_url(url);
        let (without_ssl, sslmode) = take_query_param(url, "sslmode");
        match sslmode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => {}
            Some(mode @ ("require" | "verify-ca" | "verify-full")) => {
                return Err(LocationError {
                    message: format!("sslmode={mode} in {shown}: this receiver connects to PostgreSQL without TLS"),
                    hint: "use sslmode=disable (or prefer, which falls back to plain) on a trusted network, or reach \
                           the database through a local TLS tunnel or proxy"
                        .into(),
                });
            }
            Some(other) => {
                return Err(LocationError {
                    message: format!("unknown sslmode={other:?} in {shown}"),
                    hint: "use sslmode=disable or sslmode=prefer".into(),
                });
            }
        }
        let mut config = tokio_postgres::Config::from_str(&without_ssl).map_err(|e| LocationError {
            message: format!("invalid PostgreSQL URL {shown}: {e}"),
            hint: "write postgres://USER[:PASSWORD]@HOST[:PORT]/DB (percent-encode special characters)".into(),
        })?;
        // No TLS support is compiled in; `prefer` and `allow` therefore mean plain, said here
        // rather than left to the driver.
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        config.connect_timeout(std::time::Duration::from_secs(5));
        if config.get_password().is_none()
            && let Some(password) = pg_password.filter(|p| !p.is_empty())
        {
            config.password(password);
        }
        if config.get_dbname().is_none() {
            return Err(LocationError {
                message: format!("{shown} names no database"),
                hint: "add the database name: postgres://USER@HOST:PORT/DB".into(),
            });
        }
        Ok(PgLocation { config, shown })
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl fmt::Display for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgLocation({})", self.shown)
    }
}

/// `url` with the password of its user-info and any `password=` query value shown as `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let mut shown = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
}

/// `url` without the query parameter `name`, and that parameter's value.
fn take_query_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_string(), None) };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((key, v)) if key == name => {
                value = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    (url, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn passwords_are_never_shown() {
        assert_eq!(redact_url("postgres://u:s3cret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db?password=s3cret&x=1"), "postgres://u@h/db?password=***&x=1");
        assert_eq!(redact_url("postgresql://u:p@ss@h/db"), "postgresql://u:***@h/db");
        let location = StoreLocation::parse("postgres://u:s3cret@127.0.0.1:5/db?sslmode=prefer", None).unwrap();
        assert!(!location.to_string().contains("s3cret"));
        assert!(!format!("{location:?}").contains("s3cret"));
        let error = StoreLocation::parse("mysql://u:s3cret@h/db", None).unwrap_err();
        assert!(!error.message.contains("s3cret"), "{error:?}");
    }

    #[test]
    fn store_urls() {
        assert!(
            matches!(StoreLocation::parse("sqlite:./r.db", None), Ok(StoreLocation::Sqlite(p)) if p == Path::new("./r.db"))
        );
        assert!(StoreLocation::parse("sqlite:", None).is_err());
        let Ok(StoreLocation::Postgres(pg)) = StoreLocation::parse("postgresql://u@h:7/db", Some("fromenv")) else {
            panic!("not parsed");
        };
        assert_eq!(pg.config().get_password(), Some(&b"fromenv"[..]));
        let Ok(StoreLocation::Postgres(pg)) = StoreLocation::parse("postgres://u:url@h/db", Some("fromenv")) else {
            panic!("not parsed");
        };
        assert_eq!(pg.config().get_password(), Some(&b"url"[..]), "the URL's password wins");
        let error = StoreLocation::parse("postgres://u@h/db?sslmode=require", None).unwrap_err();
        assert!(error.message.contains("without TLS"));
        assert!(StoreLocation::parse("postgres://u@h/db?sslmode=bogus", None).is_err());
        assert!(StoreLocation::parse("postgres://u@h", None).unwrap_err().message.contains("no database"));
    }
}
