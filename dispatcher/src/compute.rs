//! Compute off the async runtime: expert FFNs run on the rayon pool, and the async caller
//! awaits a oneshot, so tokio's threads never do GEMMs. A panic inside the closure (a kernel
//! bug, an allocation that cannot be satisfied) fails that one call with an error; it never
//! reaches rayon, which would abort the whole process.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};

/// Size and name the process's compute pool (rayon's global pool, threads `em-compute-{i}`:
/// Linux keeps 15 bytes of a thread's name). `None`: one thread per core. Call once, before any
/// compute; returns the pool's size.
pub fn init_pool(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    if n == 0 {
        return Err(Error::InvalidInput("the compute pool needs at least 1 thread (--compute-threads)".into()));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("em-compute-{i}"))
        .build_global()
        .map_err(|e| Error::Internal(format!("cannot start the compute pool of {n} threads: {e}")))?;
    Ok(n)
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Run `f` on the rayon pool and await its result.
pub async fn on_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_text(&*p));
        let _ = tx.send(r);
    });
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(why)) => {
            Err(Error::Internal(format!("compute task panicked ({why}); this request failed, the process serves on")))
        }
        Err(_) => Err(Error::Internal("compute task was dropped before it answered".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_on_the_pool_is_an_error_not_an_abort() {
        let e = on_pool(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        // An allocation that cannot be satisfied panics with "capacity overflow".
        let n = std::hint::black_box(usize::MAX / 2);
        let e = on_pool(move || vec![0f32; n].len()).await.unwrap_err();
        assert!(e.to_string().contains("capacity overflow"), "{e}");
        assert_eq!(on_pool(|| 7).await.unwrap(), 7, "the pool still works");
    }
}
