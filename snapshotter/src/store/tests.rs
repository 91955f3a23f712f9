use super::*;

fn record(id: u64, kind: SnapshotKind, parent: &str) -> SnapshotRecord {
    SnapshotRecord {
        id,
        kind,
        parent: parent.to_string(),
        labels: BTreeMap::new(),
        created_ns: 1,
        updated_ns: 1,
        usage: None,
        lazy: false,
        lode_image: None,
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("meta.redb")).unwrap();
    (dir, store)
}

#[test]
fn ids_are_never_reused_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let first = Store::open(&path).unwrap().next_id().unwrap();
    let second = Store::open(&path).unwrap().next_id().unwrap();
    assert!(second > first);
}

#[test]
fn parent_must_exist_and_be_committed() {
    let (_dir, store) = open();
    let err = store.create("a", &record(1, SnapshotKind::Active, "missing"));
    assert!(matches!(err, Err(StoreError::NotFound(_))), "{err:?}");
    store
        .create("a", &record(1, SnapshotKind::Active, ""))
        .unwrap();
    let err = store.create("b", &record(2, SnapshotKind::Active, "a"));
    assert!(
        matches!(err, Err(StoreError::FailedPrecondition(_))),
        "{err:?}"
    );
    let err = store.create("a", &record(3, SnapshotKind::Active, ""));
    assert!(matches!(err, Err(StoreError::AlreadyExists(_))), "{err:?}");
}

#[test]
fn commit_renames_and_keeps_the_id() {
    let (_dir, store) = open();
    store
        .create("a", &record(7, SnapshotKind::Active, ""))
        .unwrap();
    let committed = store.commit("a", "c", BTreeMap::new(), (10, 2)).unwrap();
    assert_eq!(committed.id, 7);
    assert_eq!(store.get("c").unwrap().kind, SnapshotKind::Committed);
    assert!(matches!(store.get("a"), Err(StoreError::NotFound(_))));
    store
        .create("v", &record(8, SnapshotKind::View, "c"))
        .unwrap();
    let err = store.commit("v", "d", BTreeMap::new(), (0, 0));
    assert!(
        matches!(err, Err(StoreError::FailedPrecondition(_))),
        "{err:?}"
    );
}

#[test]
fn a_parent_cannot_be_removed_before_its_children() {
    let (_dir, store) = open();
    store
        .create("a", &record(1, SnapshotKind::Active, ""))
        .unwrap();
    store.commit("a", "base", BTreeMap::new(), (0, 0)).unwrap();
    store
        .create("child", &record(2, SnapshotKind::Active, "base"))
        .unwrap();
    assert!(matches!(
        store.remove("base"),
        Err(StoreError::FailedPrecondition(_))
    ));
    store.remove("child").unwrap();
    store.remove("base").unwrap();
    assert!(store.all().unwrap().records.is_empty());
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    assert!(SnapshotRecord::decode("k", b"{not json").is_err());
    assert!(SnapshotRecord::decode("k", &[0xff, 0x00]).is_err());
}

/// Overwrites the record of `key` in `table` with bytes that do not decode.
pub(crate) fn damage(db: &MetaDb, table: TableDefinition<'_, &str, &[u8]>, key: &str) {
    let txn = db.begin_write().unwrap();
    txn.open_table(table)
        .unwrap()
        .insert(key, &b"\xffnot a record"[..])
        .unwrap();
    txn.commit().unwrap();
}

#[test]
fn a_damaged_record_hides_only_itself() {
    let (_dir, store) = open();
    store
        .create("good", &record(1, SnapshotKind::Active, ""))
        .unwrap();
    store
        .create("bad", &record(2, SnapshotKind::Active, ""))
        .unwrap();
    damage(&store.database(), SNAPSHOTS, "bad");
    let listing = store.all().unwrap();
    assert_eq!(listing.records.keys().collect::<Vec<_>>(), ["good"]);
    assert_eq!(listing.damaged, ["bad"]);
    let e = store.get("bad").unwrap_err();
    assert!(e.to_string().contains("bad"), "names the record: {e}");
}

/// Creates committed snapshot `key` naming Lode image `sha256:b1`, as a
/// pull's bootstrap layer does; returns the image.
fn image_layer(store: &Store, key: &str, id: u64) -> LodeImage {
    let image = crate::instances::test_image("sha256:b1");
    let layer = SnapshotRecord {
        lazy: true,
        lode_image: Some(image.bootstrap_digest.clone()),
        ..record(id, SnapshotKind::Committed, "")
    };
    store.create_with_image(key, &layer, Some(&image)).unwrap();
    image
}

#[test]
fn an_image_is_recorded_with_its_snapshot_and_forgotten_with_the_last_one() {
    let (_dir, store) = open();
    let image = image_layer(&store, "layer", 1);
    // A second snapshot names the same image (another pull of it).
    image_layer(&store, "again", 2);
    assert_eq!(store.image("sha256:b1").unwrap(), Some(image.clone()));
    assert_eq!(store.images().unwrap(), [image]);
    store.remove("layer").unwrap();
    assert!(!store.forget_image_unless_used("sha256:b1").unwrap());
    assert!(store.image("sha256:b1").unwrap().is_some(), "still used");
    store.remove("again").unwrap();
    assert!(store.forget_image_unless_used("sha256:b1").unwrap());
    assert_eq!(store.image("sha256:b1").unwrap(), None);
    assert!(store.images().unwrap().is_empty());
}

#[test]
fn an_image_is_kept_while_a_damaged_record_might_name_it() {
    let (_dir, store) = open();
    let image = image_layer(&store, "layer", 1);
    store
        .create("other", &record(2, SnapshotKind::Active, ""))
        .unwrap();
    store.remove("layer").unwrap();
    damage(&store.database(), SNAPSHOTS, "other");
    assert!(!store.forget_image_unless_used("sha256:b1").unwrap());
    assert_eq!(store.image("sha256:b1").unwrap(), Some(image));
}
