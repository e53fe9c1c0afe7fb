//! A standby's registration at `members/<node>`, under a lease of its own, carrying its received
//! and applied seqs, so that the primary and operators see who follows and how far behind. It
//! is refreshed at most once per [`REFRESH`], and goes with the lease when the standby stops or
//! dies (a standby whose lease expired holds nothing back).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::etcd::{revoke_lease, timed, Backoff};
use crate::keys::KeyLayout;
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
            if let Err(e) = self.serve_one_lease().await {
                tracing::warn!(error = %e, key = %self.key, "standby registration lost; registering again");
                backoff.wait().await;
            }
        }
    }

    async fn serve_one_lease(&self) -> Result<()> {
        let mut leases = self.client.lease_client();
        let ttl = self.ttl.as_secs().max(2) as i64;
        let lease = timed(self.request_timeout, leases.grant(ttl, None))
            .await?
            .id();
        self.lease.store(lease, Ordering::SeqCst);
        let (mut keeper, mut answers): (LeaseKeeper, LeaseKeepAliveStream) =
            timed(self.request_timeout, leases.keep_alive(lease)).await?;
        let mut published = None;
        loop {
            let info = MemberInfo {
                received_seq: *self.received.borrow(),
                applied_seq: *self.applied.borrow(),
            };
            if published != Some(info) {
                let put = PutOptions::new().with_lease(lease);
                timed(
                    self.request_timeout,
                    self.client
                        .kv_client()
                        .put(self.key.clone(), info.encode(), Some(put)),
                )
                .await?;
                published = Some(info);
            }
            timed(self.request_timeout, keeper.keep_alive()).await?;
            match timed(self.request_timeout, answers.message()).await? {
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
