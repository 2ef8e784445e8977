use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;

use super::*;

/// Small enough for tests to bloat a store past it in a second.
const SMALL: Policy = Policy { factor: 4, slack_bytes: 2 << 20 };
const CACHE: u64 = 8 << 20;

type Contents = BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>;

fn contents(db: &sled::Db) -> Contents {
    db.tree_names()
        .into_iter()
        .map(|name| {
            let tree = db.open_tree(&name).unwrap();
            (name.to_vec(), tree.iter().map(|kv| kv.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect())
        })
        .collect()
}

/// Overwrites 2,000 keys in two trees again and again (about 24 MB written,
/// 0.8 MB live at the end), with deletes among them.
fn bloat(db: &sled::Db, seed: u8) {
    let (data, wal) = (db.open_tree("data").unwrap(), db.open_tree("wal").unwrap());
    for round in 0..30u32 {
        let mut b = sled::Batch::default();
        for k in 0..2_000u32 {
            let key = format!("key/{k:05}");
            if (k + round) % 7 == 0 {
                b.remove(key.as_bytes());
            } else {
                b.insert(key.as_bytes(), vec![seed ^ (round as u8); 200]);
            }
        }
        data.apply_batch(b).unwrap();
        wal.insert(round.to_be_bytes(), vec![seed; 300]).unwrap();
        if round >= 2 {
            wal.remove((round - 2).to_be_bytes()).unwrap();
        }
    }
    db.flush().unwrap();
}

#[test]
fn a_bloated_store_is_rewritten_when_opened_and_keeps_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (db, files) = open(dir.path(), CACHE, Policy::NEVER).unwrap();
    assert_eq!(files, dir.path(), "a new store keeps its files in the data dir itself");
    bloat(&db, 1);
    let before = contents(&db);
    drop(db);
    std::fs::write(dir.path().join("treaty-coordinator.id"), "not sled's").unwrap();
    let bloated = file_bytes(&files);

    let (db, files) = open(dir.path(), CACHE, SMALL).unwrap();
    assert_eq!(files, dir.path().join("store-1"));
    assert_eq!(contents(&db), before);
    let after = file_bytes(&files);
    assert!(after * 4 < bloated, "{bloated} bytes became {after}");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["CURRENT", "store-1", "treaty-coordinator.id"], "the old files are gone, other files stay");
    drop(db);

    // Not bloated now: opened where it is.
    let (db, files) = open(dir.path(), CACHE, SMALL).unwrap();
    assert_eq!(files, dir.path().join("store-1"));
    // Bloated again: the next copy replaces this one.
    bloat(&db, 2);
    let before = contents(&db);
    drop(db);
    let (db, files) = open(dir.path(), CACHE, SMALL).unwrap();
    assert_eq!(files, dir.path().join("store-2"));
    assert!(!dir.path().join("store-1").exists());
    assert_eq!(contents(&db), before);
}

const CHILD_ENV: &str = "TREATY_TEST_REWRITE_CHILD";

/// Run by `a_rewrite_killed_at_any_step_loses_nothing` in a child process:
/// opens the store it is given with the failpoint it is given armed.
#[test]
#[ignore = "a child process of a_rewrite_killed_at_any_step_loses_nothing"]
fn rewrite_child() {
    let spec = std::env::var(CHILD_ENV).expect("run by a_rewrite_killed_at_any_step_loses_nothing");
    let (dir, failpoint) = spec.split_once(';').unwrap();
    fail::cfg(failpoint, "return").unwrap();
    let _ = open(Path::new(dir), CACHE, SMALL);
    eprintln!("the rewrite finished without reaching {failpoint}");
}

#[test]
fn a_rewrite_killed_at_any_step_loses_nothing() {
    for (failpoint, store_after) in
        [("storage::rewrite_before_switch", None), ("storage::rewrite_after_switch", Some("store-1"))]
    {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = open(dir.path(), CACHE, Policy::NEVER).unwrap();
        bloat(&db, 3);
        let before = contents(&db);
        drop(db);

        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "files::tests::rewrite_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, format!("{};{failpoint}", dir.path().display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{failpoint}: the child was not killed there: {stderr}");
        assert!(dir.path().join("store-1").is_dir(), "{failpoint}: the copy was made");

        // What the next open finds: the store the switch points at, whole.
        let files = resolve(dir.path()).unwrap();
        let expected = store_after.map_or_else(|| dir.path().to_path_buf(), |s| dir.path().join(s));
        assert_eq!(files, expected, "{failpoint}");
        let db = open_sled(dir.path(), &files, CACHE).unwrap();
        assert_eq!(contents(&db), before, "{failpoint}: entries lost or changed");
        drop(db);
        let leftovers: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| store_after.is_some() && n != "CURRENT" && Some(n.as_str()) != store_after)
            .collect();
        assert!(leftovers.is_empty(), "{failpoint}: the old files were not tidied: {leftovers:?}");

        // And opening it for real rewrites (again) or keeps it, whole.
        let (db, _) = open(dir.path(), CACHE, SMALL).unwrap();
        assert_eq!(contents(&db), before, "{failpoint}");
    }
}

#[test]
fn a_current_file_naming_nothing_is_refused_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("CURRENT"), "store-9\n").unwrap();
    let e = open(dir.path(), CACHE, SMALL).unwrap_err().to_string();
    assert!(e.contains("damaged") && e.contains("store-9"), "{e}");
}
