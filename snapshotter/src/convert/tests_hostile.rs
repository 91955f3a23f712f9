//! Layers that try to escape the image or confuse the merge are refused with
//! an error naming the layer and the entry; random layer stacks never panic
//! and, when accepted, always give a bootstrap that verifies.

use lode_common::format::Bootstrap;
use lode_tests::TarEntry;
use proptest::prelude::*;

use super::error::{ConvertError, EntryProblem};
use super::test_support::{convert, convert_err, convert_layers, layer, CS};

/// Asserts that `err` is an entry error for `entry` in layer `layer` and
/// that its message names both.
fn assert_refused(err: &ConvertError, layer: usize, entry: &str) -> String {
    let text = err.to_string();
    match err {
        ConvertError::Entry {
            layer: l, entry: e, ..
        } => {
            assert_eq!(l, &format!("#{layer}"), "{text}");
            assert_eq!(e, entry, "{text}");
        }
        other => panic!("expected an entry error, got {other}"),
    }
    assert!(text.contains(entry), "{text}");
    assert!(text.contains(&format!("layer #{layer}")), "{text}");
    text
}

#[test]
fn dot_dot_paths_are_refused() {
    for path in ["../etc/passwd", "a/../../x", "/../x", "a/.."] {
        let err = convert_err(vec![vec![TarEntry::file(path, "x")]]);
        let text = assert_refused(&err, 1, path);
        assert!(text.contains("'..'"), "{text}");
    }
}

#[test]
fn leading_slash_and_dot_are_normalised() {
    let c = convert(vec![vec![
        TarEntry::file("/abs", "a"),
        TarEntry::file("./rel", "r"),
    ]])
    .unwrap();
    assert_eq!(c.names("/"), ["abs", "rel"]);
}

#[test]
fn bad_hardlink_targets_are_refused() {
    let cases: &[(&str, &str)] = &[
        ("../outside", "'..'"),
        ("/../etc/passwd", "'..'"),
        ("a/../f", "'..'"),
        ("missing", "does not exist"),
        ("dir", "is a directory"),
        ("./", "image root"),
        ("f/inside-a-file", "does not exist"),
    ];
    for (target, says) in cases {
        let err = convert_err(vec![
            vec![TarEntry::file("f", "x"), TarEntry::dir("dir")],
            vec![TarEntry::hardlink("link", target)],
        ]);
        let text = assert_refused(&err, 2, "link");
        assert!(text.contains(says), "{target}: {text}");
    }
}

#[test]
fn absolute_hardlink_target_inside_the_image_is_accepted() {
    let c = convert(vec![vec![
        TarEntry::file("etc/f", "x"),
        TarEntry::hardlink("g", "/etc/f"),
    ]])
    .unwrap();
    assert_eq!(c.id("g"), c.id("etc/f"));
}

#[test]
fn hardlink_to_a_file_whited_out_earlier_is_refused() {
    let err = convert_err(vec![
        vec![TarEntry::file("f", "x")],
        vec![TarEntry::whiteout("f"), TarEntry::hardlink("g", "f")],
    ]);
    assert_refused(&err, 2, "g");
    let err = convert_err(vec![
        vec![TarEntry::file("d/f", "x")],
        vec![TarEntry::whiteout("d")],
        vec![TarEntry::hardlink("g", "d/f")],
    ]);
    assert_refused(&err, 3, "g");
}

#[test]
fn hardlink_to_a_later_entry_is_refused() {
    let err = convert_err(vec![vec![
        TarEntry::hardlink("early", "late"),
        TarEntry::file("late", "x"),
    ]]);
    assert_refused(&err, 1, "early");
}

#[test]
fn hardlink_through_a_symlink_is_refused() {
    let err = convert_err(vec![vec![
        TarEntry::file("real/f", "x"),
        TarEntry::symlink("sym", "real"),
        TarEntry::hardlink("g", "sym/f"),
    ]]);
    assert_refused(&err, 1, "g");
}

#[test]
fn symlinks_in_parent_paths_are_not_followed() {
    // Within one layer, across layers, and for whiteouts and opaque markers.
    let err = convert_err(vec![vec![
        TarEntry::symlink("etc", "/host/etc"),
        TarEntry::file("etc/passwd", "pwned"),
    ]]);
    let text = assert_refused(&err, 1, "etc/passwd");
    assert!(text.contains("parent etc is not a directory"), "{text}");

    let err = convert_err(vec![
        vec![TarEntry::symlink("lib", "../../")],
        vec![TarEntry::file("lib/x/y", "pwned")],
    ]);
    assert_refused(&err, 2, "lib/x/y");

    let err = convert_err(vec![
        vec![TarEntry::symlink("lib", "/")],
        vec![TarEntry::whiteout("lib/etc")],
    ]);
    assert_refused(&err, 2, "lib/.wh.etc");

    let err = convert_err(vec![
        vec![TarEntry::symlink("lib", "/")],
        vec![TarEntry::opaque("lib")],
    ]);
    assert_refused(&err, 2, "lib/.wh..wh..opq");
}

#[test]
fn entries_below_a_regular_file_are_refused() {
    let err = convert_err(vec![vec![
        TarEntry::file("f", "x"),
        TarEntry::file("f/child", "y"),
    ]]);
    let text = assert_refused(&err, 1, "f/child");
    assert!(text.contains("parent f is not a directory"), "{text}");
}

#[test]
fn root_cannot_become_a_non_directory() {
    for entry in [TarEntry::file(".", "x"), TarEntry::symlink("/", "x")] {
        let name = String::from_utf8_lossy(&entry.path).into_owned();
        let err = convert_err(vec![vec![entry]]);
        let text = assert_refused(&err, 1, &name);
        assert!(text.contains("root"), "{text}");
    }
}

#[test]
fn device_numbers_out_of_range_are_refused() {
    for (major, minor) in [(4096, 0), (1, 1 << 20)] {
        let err = convert_err(vec![vec![TarEntry::char_device("dev/x", major, minor)]]);
        let text = assert_refused(&err, 1, "dev/x");
        assert!(text.contains("out of range"), "{text}");
    }
    let c = convert(vec![vec![TarEntry::block_device(
        "dev/max",
        4095,
        (1 << 20) - 1,
    )]]);
    assert!(c.is_ok());
}

#[test]
fn names_and_targets_the_format_cannot_hold_are_refused() {
    let long = "n".repeat(256);
    let err = convert_err(vec![vec![TarEntry::file(&long, "x")]]);
    let text = assert_refused(&err, 1, &long);
    assert!(text.contains("255"), "{text}");

    let err = convert_err(vec![vec![TarEntry::symlink("empty", "")]]);
    assert_refused(&err, 1, "empty");
    let err = convert_err(vec![vec![TarEntry::symlink("huge", "t".repeat(4096))]]);
    assert_refused(&err, 1, "huge");

    let err = convert_err(vec![vec![TarEntry::file("x", "1").xattr("", "v")]]);
    assert!(matches!(
        err,
        ConvertError::Entry {
            problem: EntryProblem::BadXattr { .. },
            ..
        }
    ));
    for whiteout in [".wh.", "d/.wh..", "d/.wh..."] {
        let err = convert_err(vec![vec![TarEntry::file(whiteout, "")]]);
        assert_refused(&err, 1, whiteout);
    }
}

#[test]
fn ids_beyond_32_bits_and_bad_pax_times_are_refused() {
    let err = convert_err(vec![vec![TarEntry::file("big-uid", "x").owner(1 << 33, 0)]]);
    let text = assert_refused(&err, 1, "big-uid");
    assert!(text.contains("uid"), "{text}");
    let err = convert_err(vec![vec![
        TarEntry::file("t", "x").pax_record("mtime", "yesterday")
    ]]);
    assert_refused(&err, 1, "t");
}

#[test]
fn unknown_entry_types_are_refused() {
    let mut tar = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut tar);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::new(b'Z'));
        header.set_size(0);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_path("weird").unwrap();
        header.set_cksum();
        builder.append(&header, &[][..]).unwrap();
        builder.finish().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut conv = super::Converter::new(CS, 3, 1);
    let err = conv
        .apply_layer(&tar[..], "#1", &dir.path().join("blob"))
        .unwrap_err();
    let text = assert_refused(&err, 1, "weird");
    assert!(text.contains("'Z'"), "{text}");
}

#[test]
fn truncated_archives_are_read_errors() {
    let tar = layer(vec![TarEntry::file("f", vec![7u8; 5000])])
        .to_tar()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut conv = super::Converter::new(CS, 3, 1);
    let err = conv
        .apply_layer(&tar[..2000], "#1", &dir.path().join("blob"))
        .unwrap_err();
    assert!(
        matches!(err, ConvertError::LayerRead { ref layer, .. } if layer == "#1"),
        "{err}"
    );
}

/// One random entry over a tiny namespace so that entries collide often.
fn arb_entry() -> impl Strategy<Value = TarEntry> {
    let name = prop::sample::select(vec!["a", "b", "c", ".wh.a", ".wh.b"]);
    let path = prop::collection::vec(name, 1..4).prop_map(|parts| parts.join("/"));
    let target = prop::collection::vec(prop::sample::select(vec!["a", "b", "..", "c"]), 0..3)
        .prop_map(|parts| parts.join("/"));
    (path, 0..8u8, target, 0..3u8).prop_map(|(path, kind, target, size)| match kind {
        0 => TarEntry::file(&path, vec![b'x'; usize::from(size) * 40_000]),
        1 => TarEntry::dir(&path),
        2 => TarEntry::symlink(&path, if target.is_empty() { "t" } else { &target }),
        3 => TarEntry::hardlink(&path, &target),
        4 => TarEntry::whiteout(&path),
        5 => TarEntry::opaque(&path),
        6 => TarEntry::fifo(&path),
        _ => TarEntry::file(&path, "").xattr("user.x", "y"),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_layer_stacks_never_panic(
        layers in prop::collection::vec(prop::collection::vec(arb_entry(), 0..10), 1..4)
    ) {
        let layers = layers.into_iter().map(layer).collect();
        if let Ok(c) = convert_layers(layers, CS, 2) {
            let bytes = c.conv.bootstrap(&[]).expect("accepted layers must serialise");
            Bootstrap::from_bytes(bytes).unwrap().verify_all().unwrap();
        }
    }
}
