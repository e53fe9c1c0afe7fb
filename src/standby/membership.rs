//! A standby's registration at `members/<node>`, under a lease of its own, carrying its received
//! and applied seqs, so that the primary and operators see who follows and how far behind. It
//! is refreshed at most once per [`REFRESH`], and goes with the lease when the standby stops or
//! dies (a standby whose lease expired holds nothing back). A node installing a snapshot keeps
//! the same key as a `SnapshotHold`, so that the log is not trimmed past its snapshot.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::etcd::trim::read_trimmed;
use crate::etcd::{revoke_lease, timed, Backoff};
use crate::keys::{KeyLayout, NodeName};
use crate::record::Seq;

/// How often the registration is refreshed.
pub const REFRESH: Duration = Duration::from_secs(1);

/// What a member key holds: `received <seq> applied <seq>`, readable with `etcdctl get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub received_seq: Seq,
    pub applied_seq: Seq,
}

impl MemberInfo {
    pub fn encode(&self) -> String {
        format!(
            "received {} applied {}",
            self.received_seq, self.applied_seq
        )
    }

    pub fn decode(value: &[u8]) -> Result<MemberInfo> {
        let invalid = || Error::InvalidMemberValue(String::from_utf8_lossy(value).into_owned());
        let text = std::str::from_utf8(value).map_err(|_| invalid())?;
        match text.split(' ').collect::<Vec<_>>()[..] {
            ["received", received, "applied", applied] => Ok(MemberInfo {
                received_seq: Seq(received.parse().map_err(|_| invalid())?),
                applied_seq: Seq(applied.parse().map_err(|_| invalid())?),
            }),
            _ => Err(invalid()),
        }
    }
}

pub(crate) struct Membership {
    pub client: Client,
    /// The lease the registration currently lives under (0: none yet), for deregistering.
    pub lease: Arc<AtomicI64>,
    pub key: String,
    pub ttl: Duration,
    pub request_timeout: Duration,
    pub received: watch::Receiver<Seq>,
    pub applied: watch::Receiver<Seq>,
}

impl Membership {
    /// Registers and keeps the registration fresh until dropped; through etcd trouble it retries,
    /// registering anew under a new lease if the old one expired.
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        loop {
            let served = match self.register().await {
                Ok(registration) => self.keep(registration).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                tracing::warn!(error = %e, key = %self.key, "standby registration lost; registering again");
                backoff.wait().await;
            }
        }
    }

    /// Puts the registration under a new lease.
    async fn register(&self) -> Result<Registration> {
        let mut leases = self.client.lease_client();
        let ttl = self.ttl.as_secs().max(2) as i64;
        let lease = timed(self.request_timeout, leases.grant(ttl, None))
            .await?
            .id();
        self.lease.store(lease, Ordering::SeqCst);
        let (keeper, answers) = timed(self.request_timeout, leases.keep_alive(lease)).await?;
        let mut registration = Registration {
            lease,
            keeper,
            answers,
            published: None,
        };
        self.publish(&mut registration).await?;
        Ok(registration)
    }

    /// Keeps the lease alive and the positions current until the lease is lost.
    async fn keep(&self, mut registration: Registration) -> Result<()> {
        loop {
            self.publish(&mut registration).await?;
            timed(self.request_timeout, registration.keeper.keep_alive()).await?;
            match timed(self.request_timeout, registration.answers.message()).await? {
                Some(answer) if answer.ttl() > 0 => {}
                _ => {
                    return Err(Error::LeadershipLost {
                        reason: "the registration lease expired".into(),
                    })
                }
            }
            tokio::time::sleep(REFRESH).await;
        }
    }

    /// Puts the positions, if they changed since they were last put.
    async fn publish(&self, registration: &mut Registration) -> Result<()> {
        let info = MemberInfo {
            received_seq: *self.received.borrow(),
            applied_seq: *self.applied.borrow(),
        };
        if registration.published == Some(info) {
            return Ok(());
        }
        let put = PutOptions::new().with_lease(registration.lease);
        timed(
            self.request_timeout,
            self.client
                .kv_client()
                .put(self.key.clone(), info.encode(), Some(put)),
        )
        .await?;
        registration.published = Some(info);
        Ok(())
    }
}

/// A registration under a live lease.
struct Registration {
    lease: i64,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
    published: Option<MemberInfo>,
}

/// Holds the log in etcd from being trimmed past a snapshot being installed, until dropped.
///
/// Without it, a snapshot that takes longer to install than the primary's retained tail lasts
/// would be trimmed past at once, and the node would install snapshots forever. It registers the
/// node at `trimmed - 1`, which freezes trimming where it is, then at the snapshot's seq once the
/// header arrives ([`SnapshotHold::at_snapshot`]; received and applied: what the store will
/// hold). The primary never trims past its own applied seq, where its snapshots start, so the
/// snapshot is always at or past the hold. Once dropped, the registration lapses with its lease,
/// unless the node's standby has registered over it.
pub(crate) struct SnapshotHold {
    seq: watch::Sender<Seq>,
    task: tokio::task::JoinHandle<()>,
}

/// How often [`SnapshotHold::register`] follows a trim that passed it before it gives up.
const HOLD_ATTEMPTS: usize = 10;

impl SnapshotHold {
    /// Returns once the hold is in etcd and no trim has passed it.
    pub async fn register(
        client: Client,
        layout: &KeyLayout,
        node: &NodeName,
        ttl: Duration,
        request_timeout: Duration,
    ) -> Result<SnapshotHold> {
        let (seq, at) = watch::channel(Seq::NONE);
        let hold = Membership {
            client: client.clone(),
            lease: Arc::new(AtomicI64::new(0)),
            key: layout.member(node),
            ttl,
            request_timeout,
            received: at.clone(),
            applied: at,
        };
        // Just below `trimmed`: the trimmer counts a member only if it needs what etcd still has.
        let below_trimmed = || async {
            let trimmed = read_trimmed(&client, layout, request_timeout).await?;
            Ok::<_, Error>(Seq(trimmed.0.saturating_sub(1)))
        };
        seq.send_replace(below_trimmed().await?);
        let mut registration = hold.register().await?;
        for _ in 0..HOLD_ATTEMPTS {
            // A trim that committed between the read of `trimmed` and the put passed the hold:
            // follow it until a read of `trimmed` after the put finds it unchanged. From then on
            // every trim sees the hold (one that read the members before the put fails its
            // compare, `etcd::trim::trim_txn`) and stops at it.
            let held = below_trimmed().await?;
            if *seq.borrow() == held {
                let task = tokio::spawn(async move {
                    if let Err(e) = hold.keep(registration).await {
                        tracing::warn!(error = %e, key = %hold.key, "snapshot hold lost; registering again");
                    }
                    hold.run().await
                });
                return Ok(SnapshotHold { seq, task });
            }
            seq.send_replace(held);
            hold.publish(&mut registration).await?;
        }
        Err(Error::TrimmedPastHold {
            attempts: HOLD_ATTEMPTS,
        })
    }

    /// Moves the hold to the snapshot's seq (published within [`REFRESH`]).
    pub fn at_snapshot(&self, seq: Seq) {
        self.seq.send_replace(seq);
    }
}

impl Drop for SnapshotHold {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Removes the registration at once by revoking its lease.
pub(crate) async fn deregister(
    client: &Client,
    lease: i64,
    request_timeout: Duration,
) -> Result<()> {
    if lease != 0 {
        revoke_lease(client, lease, request_timeout).await?;
    }
    Ok(())
}

/// The registered members of a cluster and their positions.
pub async fn members(
    client: &Client,
    layout: &KeyLayout,
    request_timeout: Duration,
) -> Result<Vec<(String, MemberInfo)>> {
    let options = etcd_client::GetOptions::new().with_prefix();
    let response = timed(
        request_timeout,
        client
            .kv_client()
            .get(layout.members_prefix(), Some(options)),
    )
    .await?;
    response
        .kvs()
        .iter()
        .map(|kv| {
            let name =
                String::from_utf8_lossy(&kv.key()[layout.members_prefix().len()..]).into_owned();
            Ok((name, MemberInfo::decode(kv.value())?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_info_round_trips_and_refuses_garbage() {
        let info = MemberInfo {
            received_seq: Seq(1024),
            applied_seq: Seq(1000),
        };
        assert_eq!(info.encode(), "received 1024 applied 1000");
        assert_eq!(MemberInfo::decode(info.encode().as_bytes()).unwrap(), info);
        for bad in [
            "",
            "received 1 applied",
            "received x applied 2",
            "applied 1 received 2",
            "received 1 applied 2 x",
        ] {
            assert!(
                MemberInfo::decode(bad.as_bytes()).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
