//! Read-only access to spec-kitty ≤ 3.2.3 offline queues and their migration into the journal.
