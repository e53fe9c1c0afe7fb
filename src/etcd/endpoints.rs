//! Keeps a client of several etcd members off the ones that are down.
//!
//! etcd-client balances requests over all its endpoints and keeps sending a share of them to a
//! member that no longer answers (etcdv3/etcd-client#39): with one member of three killed, a
//! primary's keepalives and commits kept failing with "tcp connect error" until its lease ran
//! out, although two members served. A guard task probes each member on its own connection and
//! takes a member that fails out of the client's balance set, and puts it back once it answers.
//! It never takes out the last member left: with none answering, every request fails anyway.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// How often each member is probed: a dead member is out of the balance within about this.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a member gets to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(750);

/// Starts guarding `client`'s `endpoints` (as it was connected with them). The guard lives as
/// long as the process: a process makes its etcd clients once.
pub fn guard(client: &Client, endpoints: &[String], options: &ConnectOptions) {
    let members: Vec<Member> = endpoints
        .iter()
        .map(|url| Member {
            url: url.clone(),
            probe: None,
            in_balance: true,
        })
        .collect();
    let options = options.clone().with_connect_timeout(PROBE_TIMEOUT);
    tokio::spawn(run(client.clone(), members, options));
}

struct Member {
    url: String,
    /// Its own connection, made on the first probe.
    probe: Option<Client>,
    in_balance: bool,
}

async fn run(client: Client, mut members: Vec<Member>, options: ConnectOptions) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for index in 0..members.len() {
            let answers = probe(&mut members[index], &options).await;
            let in_balance = members.iter().filter(|m| m.in_balance).count();
            let member = &mut members[index];
            let change = match (answers, member.in_balance) {
                (false, true) if in_balance > 1 => client.remove_endpoint(&member.url).await,
                (true, false) => client.add_endpoint(&member.url).await,
                _ => continue,
            };
            match change {
                Ok(()) => {
                    member.in_balance = answers;
                    if answers {
                        tracing::info!(member = %member.url, "etcd member answers again: back in use");
                    } else {
                        tracing::warn!(member = %member.url, "etcd member does not answer: out of use until it does");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, member = %member.url, "cannot change the etcd client's members")
                }
            }
        }
    }
}

/// Whether the member answers a status request in time.
async fn probe(member: &mut Member, options: &ConnectOptions) -> bool {
    if member.probe.is_none() {
        let connect = Client::connect([member.url.as_str()], Some(options.clone()));
        match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
            Ok(Ok(probe)) => member.probe = Some(probe),
            _ => return false,
        }
    }
    let Some(probe) = member.probe.as_mut() else {
        return false;
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe.status()).await,
        Ok(Ok(_))
    )
}
