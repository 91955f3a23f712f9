//! Starting `lode-snapshotter` for tests, with its own root and socket.
