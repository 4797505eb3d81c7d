//! Pure work over a slice, split into one part per core: the results come back in order.

/// Runs `work` on parts of `items`, one per core and each at least `min_part` long, and returns
/// each part's result in the parts' order. The first part runs on the calling thread; with one
/// core, or too few items to split, `work` sees the whole slice there. Meant for work that
/// reads nothing but its part (a backlog's events to check, a chunk of a rebuild to count), so
/// that running the parts apart equals running them one after another.
///
/// The calling thread waits for the others: on a tokio runtime of several threads it says so
/// (`block_in_place`), so that its other tasks move meanwhile.
pub fn in_parts<T: Sync, R: Send>(
    items: &[T],
    min_part: usize,
    work: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 || items.len() < 2 * min_part.max(1) {
        return vec![work(items)];
    }
    let part = items.len().div_ceil(threads).max(min_part);
    let run = || {
        std::thread::scope(|scope| {
            let work = &work;
            let mut chunks = items.chunks(part);
            let first = chunks.next().unwrap_or_default();
            let others: Vec<_> = chunks
                .map(|chunk| scope.spawn(move || work(chunk)))
                .collect();
            let mut results = vec![work(first)];
            for other in others {
                // The work does not panic (no input reaches an unwrap); were it to, the panic
                // goes on here as it would have on this thread.
                match other.join() {
                    Ok(result) => results.push(result),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            results
        })
    };
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    match multi_thread {
        true => tokio::task::block_in_place(run),
        false => run(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_back_in_order_and_cover_every_item() {
        let items: Vec<u32> = (0..10_000).collect();
        let parts = in_parts(&items, 100, |part| part.to_vec());
        assert_eq!(parts.concat(), items);
        // Too few to split: one part, the whole.
        assert_eq!(in_parts(&items[..150], 100, <[u32]>::len), vec![150]);
        assert_eq!(in_parts(&items[..0], 100, <[u32]>::len), vec![0]);
    }
}
