//! A throw-away containerd (own root, state and socket in a temp dir) with
//! Lode registered as a proxy snapshotter.
