//! Compute off the async runtime: expert FFNs run on the rayon pool, and the async caller
//! awaits a oneshot, so tokio's threads never do GEMMs. A panic inside the closure (a kernel
//! bug, an allocation that cannot be satisfied) fails that one call with an error; it never
//! reaches rayon, which would abort the whole process.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};

/// Parse a CPU list in the kernel's syntax (`0-3,8,10-11`, as `taskset -c` and
/// `/proc/PID/status` write it) into sorted CPU numbers.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>> {
    let bad = |why: String| {
        Error::InvalidInput(format!("--cpus `{list}`: {why}; expected CPU numbers and ranges such as `0-3,8`"))
    };
    let num = |t: &str| t.trim().parse::<usize>().map_err(|_| bad(format!("`{}` is not a CPU number", t.trim())));
    let mut cpus = BTreeSet::new();
    for part in list.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad("an empty item".into()));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            return Err(bad(format!("range `{part}` runs backwards")));
        }
        if hi >= 1 << 16 {
            return Err(bad(format!("CPU {hi} is beyond any machine")));
        }
        cpus.extend(lo..=hi);
    }
    Ok(cpus.into_iter().collect())
}

/// The CPUs this process may run on.
#[allow(unsafe_code)]
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: `set` is a plain bitmask the call fills; its size is passed with it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(Error::Internal(format!("sched_getaffinity: {}", std::io::Error::last_os_error())));
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}

/// Bind this process (every thread it starts from now on) to `cpus`, which must be CPUs it
/// may run on. Call before [`init_pool`], so that the pool's default size is `cpus.len()`.
#[allow(unsafe_code)]
pub fn pin_process(cpus: &[usize]) -> Result<()> {
    let allowed = allowed_cpus()?;
    if cpus.is_empty() {
        return Err(Error::InvalidInput("--cpus names no CPU".into()));
    }
    if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
        return Err(Error::InvalidInput(format!(
            "--cpus: CPU {c} is not one this process may use; allowed: {}",
            cpu_list(&allowed)
        )));
    }
    // SAFETY: as above; every CPU was checked to be below CPU_SETSIZE (it is in `allowed`).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(Error::Internal(format!("sched_setaffinity: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
}

/// `cpus` (sorted) in the kernel's list syntax: `[0, 1, 2, 5]` is `0-2,5`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    out.join(",")
}

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

    #[test]
    fn cpu_lists_parse_and_print_in_the_kernel_syntax() {
        assert_eq!(parse_cpu_list("0-3,8, 10-11").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
        assert_eq!(parse_cpu_list("2,1,2").unwrap(), vec![1, 2], "sorted, without repeats");
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_list(&parse_cpu_list("0-3,8,10-11").unwrap()), "0-3,8,10-11");
        for (bad, why) in [
            ("", "an empty item"),
            ("1,,2", "an empty item"),
            ("3-1", "runs backwards"),
            ("a", "`a` is not a CPU number"),
            ("0-x", "`x` is not a CPU number"),
            ("99999", "beyond any machine"),
        ] {
            let e = parse_cpu_list(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("expected CPU numbers"), "{bad}: {e}");
        }
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let e = pin_process(&[allowed.last().unwrap() + 1]).unwrap_err().to_string();
        assert!(e.contains("is not one this process may use"), "{e}");
    }

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
