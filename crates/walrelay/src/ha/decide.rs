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
//! - Every promote and demote carries the lease generation it was decided under, and runs
//!   only if the leader key, read again just before, still bears it out (`still_stands`).

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

impl Role {
    /// As members publish it in etcd.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Stopped => "stopped",
        }
    }
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
    pub timeline: u32,
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
    /// A lease renewed less than this long ago certainly holds until the next loop.
    pub fn fence_after(&self) -> Duration {
        self.ttl.saturating_sub(self.loop_wait + self.retry_timeout)
    }

    /// Whether a lease last renewed `since_renewal` ago (never: `None`) is certain.
    pub fn fresh(&self, since_renewal: Option<Duration>) -> bool {
        since_renewal.is_some_and(|s| s < self.fence_after())
    }

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

/// A switchover asked for (`ctl switchover`, `POST /switchover`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switchover {
    /// Who takes over; the primary picks one when none was named.
    pub candidate: Option<String>,
    /// Set once the primary has stopped cleanly: where its shutdown checkpoint record
    /// starts. The candidate takes the key only once it has received beyond it.
    pub stopped_at: Option<Lsn>,
}

/// Everything one loop observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub me: String,
    pub role: Role,
    pub timeline: u32,
    pub received: Lsn,
    pub nofailover: bool,
    /// `None`: no one holds the key (or, when etcd cannot be read, no one was last seen to).
    pub leader: Option<LeaderKey>,
    /// Since the last successful renewal of this agent's lease, which the leader key is
    /// bound to; `None` if it was never renewed.
    pub since_renewal: Option<Duration>,
    pub members: Vec<Member>,
    /// In synchronous mode, the standby PostgreSQL confirms commits with...
    pub synchronous_standby: Option<String>,
    /// ...and the primary that named it (it holds every commit it acknowledged, too).
    pub synchronous_leader: Option<String>,
    pub switchover: Option<Switchover>,
}

/// What the agent does, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The lease may have run out: stop PostgreSQL at once, whatever etcd says now.
    Fence { generation: u64 },
    /// Another member holds the key: stop accepting writes now, stopping PostgreSQL at once
    /// (a later `Follow` starts it again read-only).
    Demote { generation: u64 },
    /// Go on as the primary: the lease was renewed; keep slots and the synchronous standby
    /// in order.
    Lead,
    /// Compare-and-set the leader key from absent to me, bound to my lease.
    TakeLeaderKey,
    /// Become (or, after a crash, start again as) the primary.
    Promote { generation: u64 },
    /// Run as a replica of `leader` (`None`: of no one yet, read-only): rewind or clone if
    /// needed, start, point `primary_conninfo` at it.
    Follow { leader: Option<String> },
    /// Switchover: checkpoint, stop cleanly, record where the WAL ends, give up the key.
    StepDown { generation: u64 },
    /// Leave things as they are this loop, and say why (for `ctl list` and the log).
    Wait { why: String },
}

/// The actions for one loop.
pub fn decide(o: &Observation, p: &Policy) -> Vec<Action> {
    // The lease certainly holds until the next loop: renewed within ttl − loop_wait −
    // retry_timeout. If not, what etcd said may be out of date, and a primary fences.
    let fresh = p.fresh(o.since_renewal);
    let mine = o.leader.as_ref().filter(|l| l.holder == o.me);
    let generation = o.leader.as_ref().map_or(0, |l| l.generation);
    match o.role {
        Role::Primary => match (&o.leader, fresh) {
            (_, false) => vec![Action::Fence { generation }],
            (Some(l), true) if l.holder == o.me => match &o.switchover {
                Some(s) if s.stopped_at.is_none() => vec![Action::StepDown {
                    generation: l.generation,
                }],
                _ => vec![Action::Lead],
            },
            (Some(other), true) => vec![
                Action::Demote { generation },
                Action::Follow {
                    leader: Some(other.holder.clone()),
                },
            ],
            // My key expired and no one took it: take it back (compare-and-set); if that
            // fails, the next loop sees the new holder and demotes.
            (None, true) => vec![Action::TakeLeaderKey],
        },
        Role::Replica | Role::Stopped => {
            if let Some(l) = mine {
                return if fresh {
                    vec![Action::Promote {
                        generation: l.generation,
                    }]
                } else {
                    vec![Action::Wait {
                        why: "holding the leader key but the lease was not renewed in time".into(),
                    }]
                };
            }
            if let Some(l) = &o.leader {
                return vec![Action::Follow {
                    leader: Some(l.holder.clone()),
                }];
            }
            if !fresh {
                // etcd is out of reach: serve reads, decide nothing.
                return match o.role {
                    Role::Stopped => vec![Action::Follow { leader: None }],
                    _ => vec![Action::Wait {
                        why: "etcd is out of reach".into(),
                    }],
                };
            }
            match eligible(o, p) {
                Ok(()) => vec![Action::TakeLeaderKey],
                Err(_)
                    if o.role == Role::Stopped
                        && o.switchover.as_ref().is_none_or(|s| s.stopped_at.is_none()) =>
                {
                    // Start read-only, so this node can be considered next loop.
                    vec![Action::Follow { leader: None }]
                }
                Err(why) => vec![Action::Wait { why }],
            }
        }
    }
}

/// Whether `action`, decided on the leader key read at the start of the loop, still stands
/// now that the key reads `now` (read again just before acting; `Err`: that read failed).
/// `Err(why)`: skip it, and let the next loop decide again.
///
/// - A promotion runs only while this node holds the key at the generation it was decided
///   under: a key lost since — expired, taken by another node, or even taken again by this
///   one, a new generation — means the decision was made on a lease that is gone. A key
///   that cannot be read: no promotion.
/// - A demotion (another member held the key) is skipped only if this node holds the key
///   now. Otherwise it runs, a failed read included: stopping writes is always safe, a
///   primary that does not hold the key is not.
/// - Fencing, and everything else, runs as decided: fencing never waits for etcd.
pub fn still_stands(
    action: &Action,
    me: &str,
    now: &Result<Option<LeaderKey>, String>,
) -> Result<(), String> {
    match (action, now) {
        (Action::Promote { generation }, Ok(Some(k)))
            if k.holder == me && k.generation == *generation =>
        {
            Ok(())
        }
        (Action::Promote { generation }, Ok(key)) => Err(format!(
            "promotion decided under generation {generation}, but the leader key is now {}",
            describe(key.as_ref())
        )),
        (Action::Promote { generation }, Err(e)) => Err(format!(
            "promotion decided under generation {generation}, but the leader key cannot be read again: {e}"
        )),
        (Action::Demote { generation }, Ok(Some(k))) if k.holder == me => Err(format!(
            "demotion decided under generation {generation}, but this node holds the key now ({})",
            describe(Some(k))
        )),
        _ => Ok(()),
    }
}

fn describe(key: Option<&LeaderKey>) -> String {
    match key {
        Some(k) => format!("{}'s at generation {}", k.holder, k.generation),
        None => "held by no one".into(),
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
    // A switchover matters here once the primary has stopped for it; a request it has not
    // acted on (it may have died first) does not hold up a failover.
    if let Some((s, end)) = o.switchover.as_ref().and_then(|s| Some((s, s.stopped_at?))) {
        if s.candidate.as_deref() != Some(o.me.as_str()) {
            let candidate = s.candidate.as_deref().unwrap_or("another member");
            return Err(format!("switchover to {candidate} in progress"));
        }
        if o.received <= end {
            return Err(format!(
                "switchover: received {} of the old primary's {}",
                o.received, end
            ));
        }
        return Ok(());
    }
    if p.synchronous_mode {
        // The synchronous standby holds every acknowledged commit, and so does the primary
        // that named it (back after losing its lease): they, and only they, may take over,
        // however far others received.
        let me = Some(o.me.as_str());
        if o.synchronous_standby.as_deref() != me && o.synchronous_leader.as_deref() != me {
            return Err(format!(
                "synchronous mode: only the synchronous standby ({}) may be promoted",
                o.synchronous_standby.as_deref().unwrap_or("none")
            ));
        }
        return Ok(());
    }
    // Positions compare only on one timeline: a member on a newer one has history this
    // node may lack (or contradict), whatever the LSNs say.
    let best = o
        .members
        .iter()
        .filter(|m| m.reachable && m.name != o.me && !m.nofailover)
        .map(|m| (m.timeline, m.received, std::cmp::Reverse(m.name.clone())))
        .max();
    let mine = (o.timeline, o.received, std::cmp::Reverse(o.me.clone()));
    if let Some(best) = best {
        let name = &best.2 .0;
        if best.0 > o.timeline {
            return Err(format!(
                "on timeline {}, {name} is on the newer {}",
                o.timeline, best.0
            ));
        }
        let lag = best.1.bytes_since(o.received);
        if best.0 == o.timeline && lag > p.maximum_lag_on_failover {
            return Err(format!(
                "{lag} bytes behind {name}, more than maximum_lag_on_failover"
            ));
        }
        if best > mine {
            return Err(format!("{name} is further ahead"));
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
            timeline: 1,
            received: Lsn(received),
            nofailover: false,
        }
    }

    fn observation(me: &str, role: Role, leader: Option<&str>) -> Observation {
        Observation {
            me: me.into(),
            role,
            timeline: 1,
            received: Lsn(1000),
            nofailover: false,
            leader: leader.map(|h| LeaderKey {
                holder: h.into(),
                generation: 7,
            }),
            since_renewal: Some(Duration::from_secs(1)),
            members: vec![member("a", 1000), member("b", 1000), member("c", 1000)],
            synchronous_standby: None,
            synchronous_leader: None,
            switchover: None,
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
    fn a_primary_holding_a_fresh_lease_leads() {
        let o = observation("a", Role::Primary, Some("a"));
        assert_eq!(decide(&o, &policy()), [Action::Lead]);
    }

    #[test]
    fn a_primary_that_may_lose_its_lease_demotes_before_anything_else() {
        let mut o = observation("a", Role::Primary, Some("a"));
        // ttl 10 s − loop_wait 2 s − retry 3 s = 5 s: at 5 s without renewal, fence.
        o.since_renewal = Some(Duration::from_secs(5));
        assert_eq!(decide(&o, &policy()), [Action::Fence { generation: 7 }]);
        o.since_renewal = None;
        assert_eq!(decide(&o, &policy()), [Action::Fence { generation: 7 }]);
        o.since_renewal = Some(Duration::from_millis(4999));
        assert_eq!(decide(&o, &policy()), [Action::Lead]);
        // Even when the last read said no one holds the key: that read may be stale.
        let mut none = observation("a", Role::Primary, None);
        none.since_renewal = Some(Duration::from_secs(6));
        assert_eq!(decide(&none, &policy()), [Action::Fence { generation: 0 }]);
    }

    #[test]
    fn a_primary_whose_key_another_holds_demotes_and_follows() {
        let o = observation("a", Role::Primary, Some("b"));
        assert_eq!(
            decide(&o, &policy()),
            [
                Action::Demote { generation: 7 },
                Action::Follow {
                    leader: Some("b".into())
                }
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
        for role in [Role::Replica, Role::Stopped] {
            let o = observation("b", role, Some("a"));
            assert_eq!(
                decide(&o, &policy()),
                [Action::Follow {
                    leader: Some("a".into())
                }]
            );
        }
    }

    #[test]
    fn a_replica_that_won_the_key_promotes_under_its_generation() {
        let mut o = observation("b", Role::Replica, Some("b"));
        assert_eq!(decide(&o, &policy()), [Action::Promote { generation: 7 }]);
        // A primary that crashed while its agent held the key starts again as primary.
        o.role = Role::Stopped;
        assert_eq!(decide(&o, &policy()), [Action::Promote { generation: 7 }]);
        // Not on a lease that may have run out.
        o.since_renewal = Some(Duration::from_secs(5));
        assert!(matches!(decide(&o, &policy())[0], Action::Wait { .. }));
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
        assert!(eligible(&s, &policy()).unwrap_err().contains("not running"));
        // A stopped node starts read-only so that it can be considered.
        assert_eq!(decide(&s, &policy()), [Action::Follow { leader: None }]);
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
        // The primary that named it, back read-only after losing its lease, may lead again.
        o.me = "a".into();
        o.synchronous_leader = Some("a".into());
        assert_eq!(decide(&o, &p), [Action::TakeLeaderKey]);
    }

    #[test]
    fn a_member_on_a_newer_timeline_outranks_any_position_on_an_older_one() {
        let mut o = observation("c", Role::Replica, None);
        o.received = Lsn(5000);
        o.members = vec![
            Member {
                timeline: 2,
                ..member("b", 3000)
            },
            member("c", 5000),
        ];
        assert!(
            matches!(&decide(&o, &policy())[0], Action::Wait { why } if why.contains("newer 2"))
        );
        let mut b = o.clone();
        b.me = "b".into();
        b.timeline = 2;
        b.received = Lsn(3000);
        assert_eq!(decide(&b, &policy()), [Action::TakeLeaderKey]);
    }

    #[test]
    fn with_etcd_out_of_reach_replicas_wait_and_a_stopped_node_starts_read_only() {
        let mut o = observation("b", Role::Replica, None);
        o.since_renewal = Some(Duration::from_secs(9));
        assert!(matches!(&decide(&o, &policy())[0], Action::Wait { why } if why.contains("etcd")));
        o.role = Role::Stopped;
        assert_eq!(decide(&o, &policy()), [Action::Follow { leader: None }]);
    }

    #[test]
    fn a_switchover_steps_the_primary_down_and_only_the_candidate_takes_over() {
        let mut p = observation("a", Role::Primary, Some("a"));
        p.switchover = Some(Switchover {
            candidate: None,
            stopped_at: None,
        });
        assert_eq!(decide(&p, &policy()), [Action::StepDown { generation: 7 }]);

        // The primary stopped at 2000 and named c.
        let stepped = Switchover {
            candidate: Some("c".into()),
            stopped_at: Some(Lsn(2000)),
        };
        let mut c = observation("c", Role::Replica, None);
        c.switchover = Some(stepped.clone());
        c.received = Lsn(1500);
        assert!(
            matches!(&decide(&c, &policy())[0], Action::Wait { why } if why.contains("received"))
        );
        c.received = Lsn(2000);
        assert!(matches!(decide(&c, &policy())[0], Action::Wait { .. }));
        c.received = Lsn(2001);
        assert_eq!(decide(&c, &policy()), [Action::TakeLeaderKey]);

        // b is further ahead than c, but c was named.
        let mut b = observation("b", Role::Replica, None);
        b.received = Lsn(3000);
        b.switchover = Some(stepped.clone());
        assert!(
            matches!(&decide(&b, &policy())[0], Action::Wait { why } if why.contains("switchover to c"))
        );

        // The old primary, stopped, waits rather than starting as a replica of no one.
        let mut a = observation("a", Role::Stopped, None);
        a.switchover = Some(stepped);
        assert!(matches!(decide(&a, &policy())[0], Action::Wait { .. }));

        // A request the primary never acted on (it died first) does not stop a failover.
        let mut orphan = observation("b", Role::Replica, None);
        orphan.members = vec![member("b", 1000), member("c", 900)];
        orphan.switchover = Some(Switchover {
            candidate: Some("c".into()),
            stopped_at: None,
        });
        assert_eq!(decide(&orphan, &policy()), [Action::TakeLeaderKey]);
    }

    #[test]
    fn a_promotion_runs_only_under_the_generation_it_was_decided_under() {
        let promote = Action::Promote { generation: 7 };
        let key = |holder: &str, generation| {
            Ok(Some(LeaderKey {
                holder: holder.into(),
                generation,
            }))
        };
        assert_eq!(still_stands(&promote, "b", &key("b", 7)), Ok(()));
        // Lost and taken again by this node: a new lease, a new generation.
        let why = still_stands(&promote, "b", &key("b", 9)).unwrap_err();
        assert!(why.contains("b's at generation 9"), "{why}");
        // Expired, or taken by another node.
        assert!(still_stands(&promote, "b", &Ok(None))
            .unwrap_err()
            .contains("held by no one"));
        assert!(still_stands(&promote, "b", &key("c", 8)).is_err());
        // Not known now: not promoted.
        assert!(still_stands(&promote, "b", &Err("timed out".into()))
            .unwrap_err()
            .contains("timed out"));
    }

    #[test]
    fn a_demotion_is_skipped_only_when_this_node_holds_the_key_and_fencing_never() {
        let demote = Action::Demote { generation: 7 };
        let mine = Ok(Some(LeaderKey {
            holder: "a".into(),
            generation: 9,
        }));
        assert!(still_stands(&demote, "a", &mine).is_err());
        for now in [
            Ok(Some(LeaderKey {
                holder: "b".into(),
                generation: 7,
            })),
            Ok(Some(LeaderKey {
                holder: "c".into(),
                generation: 8,
            })),
            // Stopping writes is safe; a primary without the key is not.
            Ok(None),
            Err("etcd is out of reach".into()),
        ] {
            assert_eq!(still_stands(&demote, "a", &now), Ok(()), "{now:?}");
        }
        let fence = Action::Fence { generation: 7 };
        assert_eq!(still_stands(&fence, "a", &mine), Ok(()));
        assert_eq!(still_stands(&fence, "a", &Err("down".into())), Ok(()));
    }
}
