//! ExpertMesh's dispatcher, as a library an inference engine embeds: it routes the rows of a MoE
//! layer to the workers that hold their experts and combines their answers.
//!
//! - Placement comes from a route-table watch ([`dispatcher::RouteTableRx`]); whoever holds the
//!   cluster's committed placement feeds it (the worker node feeds it from the control plane).
//! - Rows travel over an [`transport::ExpertTransport`]: gRPC ([`transport::GrpcTransport`]), or
//!   rounds of all-to-allv inside a group of GPU workers ([`collective::CollectiveTransport`]
//!   over NCCL), chosen per destination by [`transport::RoutedTransport`].
//! - Routing comes from the caller ([`Dispatcher::forward_routed`]), or the dispatcher gates
//!   by itself from the checkpoint's routers ([`Dispatcher::with_router`], [`Dispatcher::forward`]).
//!
//! No server code, no metadata store, no checkpoint required. The crate also holds what both a
//! dispatcher and a worker need from a checkpoint ([`checkpoint`]), the token owner's side of a
//! layer ([`moe`]: input checks, gate, combine, the in-process layer) and the data plane's errors.

pub mod checkpoint;
pub mod collective;
pub mod compute;
pub mod dispatcher;
pub mod error;
pub mod health;
pub mod moe;
pub mod transport;
pub mod wire;

pub use checkpoint::Checkpoint;
pub use dispatcher::{route_table_channel, Dispatcher, DispatcherConfig, RouteTable};
pub use error::{Error, Result};
pub use transport::{ExpertTransport, GrpcTransport};
