//! A bounded set of fault-injection campaigns for CI (a few seeds of a few
//! seconds each), plus proof that the checker rejects a broken build.

use std::time::Duration;

use treaty_faults::{run, CampaignConfig, FaultKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_campaigns_stay_linearizable() {
    for seed in 1..=3 {
        let report = run(CampaignConfig::new(seed)).await.unwrap();
        println!("{}", report.summary());
        assert!(!report.faults.is_empty(), "seed {seed} injected no fault");
        assert!(report.committed > 20, "seed {seed} made too little progress: {}", report.summary());
        assert!(report.linearizable(), "{}", report.summary());
    }
}

/// The same with each key on 3 of the 5 participants: transactions span
/// partitions, and reads of keys a door does not hold cross the faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_campaigns_stay_linearizable_with_partitioned_keys() {
    for seed in 11..=12 {
        let mut cfg = CampaignConfig::new(seed);
        cfg.replication = Some(3);
        let report = run(cfg).await.unwrap();
        println!("{}", report.summary());
        assert!(!report.faults.is_empty(), "seed {seed} injected no fault");
        assert!(report.committed > 20, "seed {seed} made too little progress: {}", report.summary());
        assert!(report.linearizable(), "{}", report.summary());
    }
}

/// Membership changes as the faults: participants added and removed for
/// good, one pair after another, while clients read and write (the
/// multi-process membership tests kill -9 the coordinator and the joining
/// node at each step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_campaigns_with_membership_changes_stay_linearizable() {
    let mut cfg = CampaignConfig::new(21);
    cfg.kinds = vec![FaultKind::ReplaceParticipant];
    let report = run(cfg).await.unwrap();
    println!("{}", report.summary());
    assert!(report.faults.iter().any(|f| f.contains("removed")), "no membership change: {}", report.summary());
    assert!(report.committed > 20, "too little progress: {}", report.summary());
    assert!(report.linearizable(), "{}", report.summary());
}

/// Membership changes among every other kind of fault in one campaign: a
/// participant added and one removed, then kills, pauses and partitions
/// that may hit the new participant, the coordinator or the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_mixed_with_other_faults_stay_linearizable() {
    mixed_campaign_with_membership_changes(None).await;
}

/// The same with each key on 3 of the participants: every membership
/// change moves partitions (to the new participant, away from the removed
/// one) while kills, pauses and partitions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_moves_mixed_with_other_faults_stay_linearizable() {
    mixed_campaign_with_membership_changes(Some(3)).await;
}

async fn mixed_campaign_with_membership_changes(replication: Option<usize>) {
    let mut cfg = CampaignConfig::new(1);
    cfg.replication = replication;
    cfg.kinds = FaultKind::ALL.to_vec();
    cfg.kinds.push(FaultKind::ReplaceParticipant);
    cfg.duration = std::time::Duration::from_secs(12);
    let report = run(cfg).await.unwrap();
    println!("{}", report.summary());
    assert!(report.faults.iter().any(|f| f.contains("removed")), "no membership change: {}", report.summary());
    assert!(report.faults.iter().any(|f| !f.contains("removed")), "no other fault: {}", report.summary());
    assert!(report.committed > 20, "too little progress: {}", report.summary());
    assert!(report.linearizable(), "{}", report.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_build_whose_reads_skip_the_prepared_wait() {
    let mut cfg = CampaignConfig::new(42);
    cfg.broken = true;
    cfg.faults = false;
    cfg.duration = Duration::from_secs(6);
    cfg.groups = 1;
    cfg.clients = 8;
    let report = run(cfg).await.unwrap();
    println!("{}", report.summary());
    assert!(!report.linearizable(), "the broken build passed the check: {}", report.summary());
}
