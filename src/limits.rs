//! Size limits, shared by the append path (which refuses a record that can never fit a batch) and
//! the decoder (which refuses anything larger before it allocates or decompresses).

use crate::error::{Error, Result};
use crate::record::{Op, Record};

/// Bytes of a bincode length prefix for lengths up to `u32::MAX`, plus one byte for the op.
const RECORD_FRAMING_BYTES: usize = 1 + 5 + 5;

/// etcd's default `--max-request-bytes` is 1.5 MiB and the batch travels in the same request as
/// the commit pointer and the keys; this leaves room for both.
pub const ETCD_REQUEST_ROOM: usize = 1_536 * 1024 - 8 * 1024;

/// The decoder's absolute ceiling on a batch's uncompressed body, whatever the configuration.
pub const HARD_MAX_UNCOMPRESSED: usize = 64 << 20;

/// Bytes of the fixed header every encoded batch starts with (its layout: [`crate::batch`]).
/// Here because the limits are checked against it, and the format builds on the limits.
pub const BATCH_HEADER_LEN: usize = 48;

/// The largest encoded batch a body of `body_len` bytes can produce: the header and zstd's
/// bound on the compressed body.
pub fn worst_case_encoded_len(body_len: usize) -> usize {
    BATCH_HEADER_LEN + zstd::zstd_safe::compress_bound(body_len)
}

/// Size limits. [`Limits::default`] documents each default; [`Limits::validate`] checks that
/// they fit together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest key. Default 4 KiB.
    pub max_key_bytes: usize,
    /// Largest value. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Hard cap on an encoded batch (header + compressed body). Default 1 MiB + 64 KiB: room for
    /// one maximal record even when it does not compress, and well below etcd's request limit.
    pub max_batch_bytes: usize,
    /// Cap on a batch's uncompressed body; bounds decompression. Default 8 MiB.
    pub max_uncompressed_batch_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4 * 1024,
            max_value_bytes: 1024 * 1024,
            max_batch_bytes: 1024 * 1024 + 64 * 1024,
            max_uncompressed_batch_bytes: 8 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Checks that the limits fit together: a maximal record fits a batch even when it does not
    /// compress, and no limit goes past what etcd or the decoder accepts.
    pub fn validate(&self) -> Result<()> {
        let max_record = self.max_key_bytes + self.max_value_bytes + RECORD_FRAMING_BYTES;
        let worst_batch = worst_case_encoded_len(max_record);
        let fail = |msg: String| Err(Error::InvalidLimits(msg));
        if self.max_key_bytes == 0 {
            return fail("max_key_bytes must be at least 1".into());
        }
        if self.max_batch_bytes > ETCD_REQUEST_ROOM {
            return fail(format!(
                "max_batch_bytes {} is over {ETCD_REQUEST_ROOM}, what one etcd request can carry",
                self.max_batch_bytes
            ));
        }
        if worst_batch > self.max_batch_bytes {
            return fail(format!(
                "a record with a {}-byte key and a {}-byte value may encode to {worst_batch} bytes, \
                 over max_batch_bytes {}",
                self.max_key_bytes, self.max_value_bytes, self.max_batch_bytes
            ));
        }
        if max_record > self.max_uncompressed_batch_bytes
            || self.max_uncompressed_batch_bytes > HARD_MAX_UNCOMPRESSED
        {
            return fail(format!(
                "max_uncompressed_batch_bytes {} must be between {max_record} (one maximal record) \
                 and {HARD_MAX_UNCOMPRESSED}",
                self.max_uncompressed_batch_bytes
            ));
        }
        Ok(())
    }

    /// Refuses a record that breaks a limit. With validated limits, a record that passes always
    /// fits a batch of its own.
    pub fn check_record(&self, record: &Record) -> Result<()> {
        if record.key.len() > self.max_key_bytes {
            return Err(Error::RecordTooLarge {
                part: "key",
                len: record.key.len(),
                limit: self.max_key_bytes,
            });
        }
        if record.value.len() > self.max_value_bytes {
            return Err(Error::RecordTooLarge {
                part: "value",
                len: record.value.len(),
                limit: self.max_value_bytes,
            });
        }
        if record.op == Op::Delete && !record.value.is_empty() {
            return Err(Error::DeleteWithValue {
                len: record.value.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn limits_where_a_maximal_record_cannot_fit_a_batch_are_refused() {
        let limits = Limits {
            max_batch_bytes: 1024 * 1024,
            ..Limits::default()
        };
        let err = limits.validate().unwrap_err().to_string();
        assert!(err.contains("over max_batch_bytes"), "{err}");
    }

    #[test]
    fn batch_cap_beyond_an_etcd_request_is_refused() {
        let limits = Limits {
            max_batch_bytes: 2 << 20,
            ..Limits::default()
        };
        assert!(limits.validate().is_err());
    }

    #[test]
    fn oversized_key_and_value_are_refused_with_their_sizes() {
        let limits = Limits::default();
        let err = limits
            .check_record(&Record::put(vec![0; 4097], b"v".to_vec()))
            .unwrap_err();
        assert!(matches!(
            err,
            Error::RecordTooLarge {
                part: "key",
                len: 4097,
                limit: 4096
            }
        ));
        let err = limits.check_record(&Record::put(b"k".to_vec(), vec![0; (1 << 20) + 1]));
        assert!(matches!(
            err,
            Err(Error::RecordTooLarge { part: "value", .. })
        ));
    }

    #[test]
    fn delete_with_a_value_is_refused() {
        let record = Record {
            op: Op::Delete,
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        };
        assert!(matches!(
            Limits::default().check_record(&record),
            Err(Error::DeleteWithValue { len: 1 })
        ));
    }
}
