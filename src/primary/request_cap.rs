//! etcd's request limit, as a primary learns it, and how a batch etcd refused is cut.
//!
//! etcd does not say what its `--max-request-bytes` is; it refuses a request over it before
//! proposing it, so nothing was written and the outcome is known. The primary then caps the
//! batches it seals below what was refused, and cuts the refused batch between its appends
//! into batches under the cap, committing them in the same term with the seqs they already
//! have (an append's records stay in one batch: an append is atomic). Only an append that
//! alone is refused cannot be carried; it is refused, and its seqs, owed to the batches sealed
//! behind it, end the term (docs/ARCHITECTURE.md, invariant 16).

/// What a primary knows of etcd's request limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RequestCap {
    /// Batches are sealed at this many payload (key + value) bytes.
    pub max_batch_bytes: usize,
    /// The smallest request etcd refused as too large, once it refused one.
    pub refused: Option<usize>,
}

impl RequestCap {
    /// The cap after etcd refused a request of `bytes`: batches at half the smallest request
    /// refused (payload bytes encode to about as many bytes, or fewer), never raised.
    pub fn after_refusal(self, bytes: usize) -> RequestCap {
        let refused = self.refused.map_or(bytes, |r| r.min(bytes));
        RequestCap {
            max_batch_bytes: self.max_batch_bytes.min(refused / 2).max(1),
            refused: Some(refused),
        }
    }
}

/// Cuts a refused batch's appends — their payload bytes, in order — into consecutive runs of at
/// most `cap` bytes, and returns the runs' lengths in appends. A run over `cap` is a single
/// append. Two or more appends always make two or more runs, so each refusal makes the parts
/// smaller even when the appends fit the cap by payload: a batch of one append is the end.
pub(crate) fn cut(append_bytes: &[usize], cap: usize) -> Vec<usize> {
    let mut runs = Vec::new();
    let (mut len, mut bytes) = (0, 0);
    for &size in append_bytes {
        if len > 0 && bytes + size > cap {
            runs.push(len);
            (len, bytes) = (0, 0);
        }
        len += 1;
        bytes += size;
    }
    if len > 0 {
        runs.push(len);
    }
    if runs.len() == 1 && append_bytes.len() > 1 {
        return halves(append_bytes);
    }
    runs
}

/// Two runs, the first the shortest prefix holding at least half the bytes (and leaving at least
/// one append to the second).
fn halves(append_bytes: &[usize]) -> Vec<usize> {
    let total: usize = append_bytes.iter().sum();
    let mut prefix = 0;
    let mut first = append_bytes.len() - 1;
    for (i, &size) in append_bytes.iter().enumerate() {
        prefix += size;
        if prefix * 2 >= total {
            first = (i + 1).min(append_bytes.len() - 1);
            break;
        }
    }
    vec![first, append_bytes.len() - first]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_first_refusal_caps_batches_at_half_of_it() {
        let cap = RequestCap {
            max_batch_bytes: 256 * 1024,
            refused: None,
        };
        assert_eq!(
            cap.after_refusal(300_000),
            RequestCap {
                max_batch_bytes: 150_000,
                refused: Some(300_000)
            }
        );
    }

    #[test]
    fn a_refusal_never_raises_the_cap() {
        let cap = RequestCap {
            max_batch_bytes: 10_000,
            refused: Some(100_000),
        };
        assert_eq!(
            cap.after_refusal(400_000),
            RequestCap {
                max_batch_bytes: 10_000,
                refused: Some(100_000)
            }
        );
    }

    #[test]
    fn a_smaller_refusal_lowers_both() {
        let cap = RequestCap {
            max_batch_bytes: 150_000,
            refused: Some(300_000),
        };
        assert_eq!(
            cap.after_refusal(200_000),
            RequestCap {
                max_batch_bytes: 100_000,
                refused: Some(200_000)
            }
        );
    }

    #[test]
    fn the_cap_is_never_zero() {
        let cap = RequestCap {
            max_batch_bytes: 10,
            refused: None,
        };
        assert_eq!(cap.after_refusal(1).max_batch_bytes, 1);
    }

    #[test]
    fn appends_are_cut_into_runs_under_the_cap() {
        assert_eq!(cut(&[40, 40, 40, 40, 40], 100), vec![2, 2, 1]);
    }

    #[test]
    fn an_append_over_the_cap_is_a_run_of_its_own() {
        assert_eq!(cut(&[10, 500, 10, 10], 100), vec![1, 1, 2]);
    }

    #[test]
    fn appends_that_fit_the_cap_are_still_halved_by_bytes() {
        assert_eq!(cut(&[10, 10, 10, 10], 100), vec![2, 2]);
        assert_eq!(cut(&[90, 5, 5], 100), vec![1, 2]);
        assert_eq!(cut(&[5, 5, 90], 100), vec![2, 1]);
    }

    #[test]
    fn one_append_is_one_run() {
        assert_eq!(cut(&[1_000], 100), vec![1]);
    }

    proptest! {
        #[test]
        fn runs_cover_every_append_in_order_and_make_progress(
            sizes in proptest::collection::vec(0usize..1_000, 1..50),
            cap in 1usize..2_000,
        ) {
            let runs = cut(&sizes, cap);
            prop_assert_eq!(runs.iter().sum::<usize>(), sizes.len());
            prop_assert!(runs.iter().all(|&len| len > 0));
            if sizes.len() > 1 {
                prop_assert!(runs.len() > 1, "a refusal must make the parts smaller");
            }
            let mut at = 0;
            for len in runs {
                let bytes: usize = sizes[at..at + len].iter().sum();
                prop_assert!(bytes <= cap || len == 1, "a run over the cap is one append");
                at += len;
            }
        }
    }
}
