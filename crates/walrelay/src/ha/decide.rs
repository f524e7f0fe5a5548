//! One loop of an HA agent: from what it observed (its own PostgreSQL, the leader key, the
//! other members) to what it must do, in order.
//!
//! The rules, in priority order:
//! - Fencing first. A primary that cannot be sure its lease still holds until the next loop
//!   (the last renewal is older than `ttl - loop_wait - retry_timeout`) demotes before
//!   anything else: never two writable primaries.
//! - A primary whose leader key is held by another member demotes and follows it.
//! - A primary holding the key renews it; one whose key expired takes it again only if no
//!   one else did (compare-and-set), else demotes.
//! - A replica follows the key's holder. With no holder, only an eligible replica — not
//!   tagged nofailover, within `maximum_lag_on_failover` of the most advanced reachable
//!   member, the most advanced itself (ties broken by name); in synchronous mode the
//!   synchronous standby and no other — tries to take the key, and promotes only once it
//!   holds it.
//! - Every promote and demote carries the lease generation it was decided under.

use std::time::Duration;

use walrelay_model::Lsn;

/// What PostgreSQL on this node is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// Not running (or not answering).
    Stopped,
}

/// The leader key as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub holder: String,
    /// The lease's generation: it grows with every new lease, so an action stamped with an
    /// old one is recognisably stale.
    pub generation: u64,
}

/// Another member, as its own key in etcd says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub reachable: bool,
    pub received: Lsn,
    pub nofailover: bool,
}

/// The timings and policies of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub ttl: Duration,
    pub loop_wait: Duration,
    pub retry_timeout: Duration,
    pub maximum_lag_on_failover: u64,
    pub synchronous_mode: bool,
}

impl Policy {
    /// `loop_wait + 2 × retry_timeout ≤ ttl`: a primary that fails to renew for a whole
    /// retry has time to demote before its lease can expire.
    pub fn validate(&self) -> Result<(), String> {
        if self.loop_wait + 2 * self.retry_timeout > self.ttl {
            return Err(format!(
                "loop_wait ({:?}) + 2 × retry_timeout ({:?}) must not exceed ttl ({:?})",
                self.loop_wait, self.retry_timeout, self.ttl
            ));
        }
        Ok(())
    }
}

/// Everything one loop observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub me: String,
    pub role: Role,
    pub received: Lsn,
    pub nofailover: bool,
    /// `None`: no one holds the key.
    pub leader: Option<LeaderKey>,
    /// Since the last successful renewal of my lease (when I hold the key).
    pub since_renewal: Option<Duration>,
    pub members: Vec<Member>,
    /// In synchronous mode, the standby PostgreSQL confirms commits with.
    pub synchronous_standby: Option<String>,
}

/// What the agent does, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop accepting writes now (demote, or stop PostgreSQL if demoting fails).
    Demote {
        generation: u64,
    },
    RenewLease,
    /// Compare-and-set the leader key from empty to me (or from my own expired lease).
    TakeLeaderKey,
    Promote {
        generation: u64,
    },
    /// Point replication at the holder (`primary_conninfo`), restarting if it changed.
    Follow {
        leader: String,
    },
    /// Leave things as they are this loop, and say why (for `ctl list` and the log).
    Wait {
        why: String,
    },
}

/// The actions for one loop.
pub fn decide(o: &Observation, p: &Policy) -> Vec<Action> {
    let held_by_me = o.leader.as_ref().filter(|l| l.holder == o.me);
    let generation = o.leader.as_ref().map_or(0, |l| l.generation);
    match o.role {
        Role::Primary => {
            if let Some(l) = held_by_me {
                let deadline = p.ttl.saturating_sub(p.loop_wait + p.retry_timeout);
                if o.since_renewal.is_none_or(|s| s >= deadline) {
                    // The lease may run out before the next loop: writes stop first.
                    return vec![
                        Action::Demote {
                            generation: l.generation,
                        },
                        Action::RenewLease,
                    ];
                }
                return vec![Action::RenewLease];
            }
            match &o.leader {
                Some(other) => vec![
                    Action::Demote { generation },
                    Action::Follow {
                        leader: other.holder.clone(),
                    },
                ],
                // My key expired and no one took it: take it back (compare-and-set); if
                // that fails, the next loop sees the new holder and demotes.
                None => vec![Action::TakeLeaderKey],
            }
        }
        Role::Replica | Role::Stopped => match &o.leader {
            Some(l) if l.holder == o.me => {
                // I won the key (last loop's TakeLeaderKey): now promote.
                vec![Action::Promote {
                    generation: l.generation,
                }]
            }
            Some(l) => vec![Action::Follow {
                leader: l.holder.clone(),
            }],
            None => match eligible(o, p) {
                Ok(()) => vec![Action::TakeLeaderKey],
                Err(why) => vec![Action::Wait { why }],
            },
        },
    }
}

/// Whether this node may take the leader key now that no one holds it; why not, if not.
pub fn eligible(o: &Observation, p: &Policy) -> Result<(), String> {
    if o.role == Role::Stopped {
        return Err("PostgreSQL is not running".into());
    }
    if o.nofailover {
        return Err("tagged nofailover".into());
    }
    if p.synchronous_mode {
        // The synchronous standby holds every acknowledged commit: it, and only it, may
        // take over, however far others received.
        if o.synchronous_standby.as_deref() != Some(o.me.as_str()) {
            return Err(format!(
                "synchronous mode: only the synchronous standby ({}) may be promoted",
                o.synchronous_standby.as_deref().unwrap_or("none")
            ));
        }
        return Ok(());
    }
    let best = o
        .members
        .iter()
        .filter(|m| m.reachable && m.name != o.me && !m.nofailover)
        .map(|m| (m.received, std::cmp::Reverse(m.name.clone())))
        .max();
    let mine = (o.received, std::cmp::Reverse(o.me.clone()));
    if let Some(best) = best {
        let lag = best.0 .0.saturating_sub(o.received.0);
        if lag > p.maximum_lag_on_failover {
            return Err(format!(
                "{lag} bytes behind {}, more than maximum_lag_on_failover",
                best.1 .0
            ));
        }
        if best > mine {
            return Err(format!("{} is further ahead", best.1 .0));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            ttl: Duration::from_secs(10),
            loop_wait: Duration::from_secs(2),
            retry_timeout: Duration::from_secs(3),
            maximum_lag_on_failover: 1 << 20,
            synchronous_mode: false,
        }
    }

    fn member(name: &str, received: u64) -> Member {
        Member {
            name: name.into(),
            reachable: true,
            received: Lsn(received),
            nofailover: false,
        }
    }

    fn observation(me: &str, role: Role, leader: Option<&str>) -> Observation {
        Observation {
            me: me.into(),
            role,
            received: Lsn(1000),
            nofailover: false,
            leader: leader.map(|h| LeaderKey {
                holder: h.into(),
                generation: 7,
            }),
            since_renewal: Some(Duration::from_secs(1)),
            members: vec![member("a", 1000), member("b", 1000), member("c", 1000)],
            synchronous_standby: None,
        }
    }

    #[test]
    fn the_policy_rule_is_checked() {
        assert!(policy().validate().is_ok());
        let bad = Policy {
            retry_timeout: Duration::from_secs(5),
            ..policy()
        };
        assert!(bad.validate().unwrap_err().contains("must not exceed ttl"));
    }

    #[test]
    fn a_primary_holding_its_lease_renews_it() {
        let o = observation("a", Role::Primary, Some("a"));
        assert_eq!(decide(&o, &policy()), [Action::RenewLease]);
    }

    #[test]
    fn a_primary_that_may_lose_its_lease_demotes_before_anything_else() {
        let mut o = observation("a", Role::Primary, Some("a"));
        // ttl 10 s − loop_wait 2 s − retry 3 s = 5 s: at 5 s without renewal, fence.
        o.since_renewal = Some(Duration::from_secs(5));
        let actions = decide(&o, &policy());
        assert_eq!(actions[0], Action::Demote { generation: 7 });
        o.since_renewal = None;
        assert_eq!(decide(&o, &policy())[0], Action::Demote { generation: 7 });
        o.since_renewal = Some(Duration::from_millis(4999));
        assert_eq!(decide(&o, &policy()), [Action::RenewLease]);
    }

    #[test]
    fn a_primary_whose_key_another_holds_demotes_and_follows() {
        let o = observation("a", Role::Primary, Some("b"));
        assert_eq!(
            decide(&o, &policy()),
            [
                Action::Demote { generation: 7 },
                Action::Follow { leader: "b".into() }
            ]
        );
    }

    #[test]
    fn a_primary_whose_key_expired_tries_to_take_it_back() {
        let o = observation("a", Role::Primary, None);
        assert_eq!(decide(&o, &policy()), [Action::TakeLeaderKey]);
    }

    #[test]
    fn a_replica_follows_the_holder() {
        let o = observation("b", Role::Replica, Some("a"));
        assert_eq!(
            decide(&o, &policy()),
            [Action::Follow { leader: "a".into() }]
        );
    }

    #[test]
    fn a_replica_that_won_the_key_promotes_under_its_generation() {
        let o = observation("b", Role::Replica, Some("b"));
        assert_eq!(decide(&o, &policy()), [Action::Promote { generation: 7 }]);
    }

    #[test]
    fn with_no_holder_only_the_most_advanced_eligible_replica_takes_the_key() {
        let mut o = observation("b", Role::Replica, None);
        o.members = vec![member("a", 0), member("b", 1000), member("c", 900)];
        assert_eq!(decide(&o, &policy()), [Action::TakeLeaderKey]);

        let mut c = o.clone();
        c.me = "c".into();
        c.received = Lsn(900);
        assert!(
            matches!(&decide(&c, &policy())[0], Action::Wait { why } if why.contains("b is further ahead"))
        );

        // Equal positions: the name decides, so exactly one tries.
        let mut tie = observation("b", Role::Replica, None);
        tie.members = vec![member("b", 1000), member("c", 1000)];
        assert_eq!(decide(&tie, &policy()), [Action::TakeLeaderKey]);
        tie.me = "c".into();
        assert!(matches!(decide(&tie, &policy())[0], Action::Wait { .. }));
    }

    #[test]
    fn unreachable_and_nofailover_members_do_not_block_a_failover() {
        let mut o = observation("c", Role::Replica, None);
        o.received = Lsn(500);
        o.members = vec![
            Member {
                reachable: false,
                ..member("a", 2000)
            },
            Member {
                nofailover: true,
                ..member("b", 1500)
            },
            member("c", 500),
        ];
        assert_eq!(decide(&o, &policy()), [Action::TakeLeaderKey]);
    }

    #[test]
    fn a_replica_too_far_behind_or_tagged_nofailover_or_stopped_waits() {
        let mut o = observation("c", Role::Replica, None);
        o.received = Lsn(0);
        o.members = vec![member("b", 2 << 20), member("c", 0)];
        assert!(
            matches!(&decide(&o, &policy())[0], Action::Wait { why } if why.contains("maximum_lag_on_failover"))
        );

        let mut n = observation("b", Role::Replica, None);
        n.nofailover = true;
        assert!(
            matches!(&decide(&n, &policy())[0], Action::Wait { why } if why.contains("nofailover"))
        );

        let s = observation("b", Role::Stopped, None);
        assert!(
            matches!(&decide(&s, &policy())[0], Action::Wait { why } if why.contains("not running"))
        );
    }

    #[test]
    fn in_synchronous_mode_only_the_synchronous_standby_may_take_the_key() {
        let p = Policy {
            synchronous_mode: true,
            ..policy()
        };
        let mut o = observation("b", Role::Replica, None);
        o.synchronous_standby = Some("c".into());
        assert!(
            matches!(&decide(&o, &p)[0], Action::Wait { why } if why.contains("synchronous standby (c)"))
        );
        o.me = "c".into();
        assert_eq!(decide(&o, &p), [Action::TakeLeaderKey]);
    }
}
