//! When a node campaigns for the leadership: the policy ([`Campaign`]) and the decision taken
//! before each campaign ([`before_campaign`]), a pure function; `Runner::campaign` in the node
//! is its I/O shell.
//!
//! Why a policy rather than a flag: a `primary` and a `standby --failover` started together
//! both find no leader key. Were both to campaign at once, either could win — and an operator
//! who started one node as the primary would find it waiting behind the other. A failover
//! standby therefore takes over only once a leader it followed is gone, or, when it has seen
//! none since it started, after a grace period in which a primary would have taken the key.

use std::time::Duration;

/// When a node campaigns for the leadership by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Campaign {
    /// Never: only a manual promotion makes it lead (a standby without `--failover`).
    Never,
    /// At once, and again whenever the leader key goes (a node meant to lead: `fencelog
    /// primary`). A campaign never overwrites a live leader's key.
    AtOnce,
    /// Once a leader it followed is gone; having seen no leader since it started, only after
    /// `grace` (a failover standby: a primary started with it wins the first election).
    AfterLeader { grace: Duration },
}

impl Campaign {
    /// True if the node campaigns by itself at all.
    pub fn campaigns(self) -> bool {
        self != Campaign::Never
    }
}

/// What the node does next, before campaigning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BeforeCampaign {
    /// Never campaign: wait for a manual promotion.
    Never,
    /// Campaign now (a campaign itself waits while a leader holds the key).
    Campaign,
    /// Look for a leader key again, for at most this long before deciding again.
    LookForLeader { within: Duration },
}

/// The decision: `seen_leader` is whether this node has seen a leader key (or led itself)
/// since it started, `waited` how long it has been looking.
pub(crate) fn before_campaign(
    campaign: Campaign,
    seen_leader: bool,
    waited: Duration,
) -> BeforeCampaign {
    match campaign {
        Campaign::Never => BeforeCampaign::Never,
        Campaign::AtOnce => BeforeCampaign::Campaign,
        Campaign::AfterLeader { .. } if seen_leader => BeforeCampaign::Campaign,
        Campaign::AfterLeader { grace } if waited >= grace => BeforeCampaign::Campaign,
        Campaign::AfterLeader { grace } => BeforeCampaign::LookForLeader {
            within: grace - waited,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(5);
    const FAILOVER: Campaign = Campaign::AfterLeader { grace: GRACE };

    #[test]
    fn a_node_that_never_campaigns_waits_for_a_promotion_whatever_it_saw() {
        for seen in [false, true] {
            assert_eq!(
                before_campaign(Campaign::Never, seen, GRACE * 2),
                BeforeCampaign::Never
            );
        }
    }

    #[test]
    fn a_node_meant_to_lead_campaigns_at_once() {
        assert_eq!(
            before_campaign(Campaign::AtOnce, false, Duration::ZERO),
            BeforeCampaign::Campaign
        );
    }

    #[test]
    fn a_failover_standby_that_saw_a_leader_campaigns_for_when_it_goes() {
        assert_eq!(
            before_campaign(FAILOVER, true, Duration::ZERO),
            BeforeCampaign::Campaign
        );
    }

    #[test]
    fn a_failover_standby_that_saw_no_leader_looks_for_one_through_the_rest_of_its_grace() {
        assert_eq!(
            before_campaign(FAILOVER, false, Duration::from_secs(2)),
            BeforeCampaign::LookForLeader {
                within: Duration::from_secs(3)
            }
        );
    }

    #[test]
    fn a_failover_standby_campaigns_once_its_grace_passed_with_no_leader() {
        assert_eq!(
            before_campaign(FAILOVER, false, GRACE),
            BeforeCampaign::Campaign
        );
    }
}
