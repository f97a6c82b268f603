//! Compute off the async runtime: expert FFNs run on the rayon pool, and the async caller
//! awaits a oneshot, so tokio's threads never do GEMMs.

use crate::error::{Result, WorkerError};

/// Run `f` on the rayon pool and await its result.
pub async fn on_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.map_err(|_| WorkerError::Internal("compute task panicked".into()))
}
