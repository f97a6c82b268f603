//! The subcommands: each module owns its arguments and its `run`; helpers they share live in
//! `crate::shared`, local clusters in `crate::local`.

pub(crate) mod backend;
pub(crate) mod bench;
pub(crate) mod certs;
pub(crate) mod coordinator;
pub(crate) mod drain;
pub(crate) mod forward;
pub(crate) mod gen;
pub(crate) mod placement;
pub(crate) mod plan;
pub(crate) mod status;
pub(crate) mod up;
pub(crate) mod worker;
