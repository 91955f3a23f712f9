//! containerd's snapshotter trait over [`LodeSnapshotter`], timing every call.

use std::collections::HashMap;
use std::time::Instant;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Snapshotter, Usage};

use super::filter::{any_matches, Candidate, Filter};
use super::{to_info, LodeSnapshotter, ServiceError};
use crate::store::SnapshotKind;

type InfoStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Info, ServiceError>> + Send + 'static>,
>;

impl LodeSnapshotter {
    fn observe<T>(&self, op: &'static str, started: Instant, result: &Result<T, ServiceError>) {
        self.metrics.observe_op(op, started.elapsed());
        if let Err(error) = result {
            // AlreadyExists for a lazily available layer is the expected answer.
            if !matches!(error, ServiceError::LayerAvailable(_)) {
                tracing::debug!(op, %error, "snapshot operation failed");
            }
        }
    }
}

#[async_trait::async_trait]
impl Snapshotter for LodeSnapshotter {
    type Error = ServiceError;
    type InfoStream = InfoStream;

    async fn stat(&self, key: String) -> Result<Info, ServiceError> {
        let started = Instant::now();
        let result = self
            .store
            .get(&key)
            .map(|r| to_info(key, r))
            .map_err(Into::into);
        self.observe("stat", started, &result);
        result
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, ServiceError> {
        let started = Instant::now();
        let result = LodeSnapshotter::update(self, info, fieldpaths);
        self.observe("update", started, &result);
        result
    }

    async fn usage(&self, key: String) -> Result<Usage, ServiceError> {
        let started = Instant::now();
        let result = LodeSnapshotter::usage(self, &key)
            .await
            .map(|(size, inodes)| Usage { size, inodes });
        self.observe("usage", started, &result);
        result
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, ServiceError> {
        let started = Instant::now();
        let result = LodeSnapshotter::mounts(self, &key).await;
        self.observe("mounts", started, &result);
        result
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, ServiceError> {
        let started = Instant::now();
        let result = self.create(SnapshotKind::Active, key, parent, labels).await;
        self.observe("prepare", started, &result);
        result
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, ServiceError> {
        let started = Instant::now();
        let result = self.create(SnapshotKind::View, key, parent, labels).await;
        self.observe("view", started, &result);
        result
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), ServiceError> {
        let started = Instant::now();
        let result = LodeSnapshotter::commit(self, &name, &key, labels).await;
        self.observe("commit", started, &result);
        result
    }

    async fn remove(&self, key: String) -> Result<(), ServiceError> {
        let started = Instant::now();
        let result = LodeSnapshotter::remove(self, &key).await;
        self.observe("remove", started, &result);
        result
    }

    async fn clear(&self) -> Result<(), ServiceError> {
        let started = Instant::now();
        let result = self.cleanup().await;
        self.observe("cleanup", started, &result);
        result
    }

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<InfoStream, ServiceError> {
        let started = Instant::now();
        let result = (|| {
            let filters = filters
                .iter()
                .map(|f| Filter::parse(f).map_err(ServiceError::InvalidArgument))
                .collect::<Result<Vec<_>, _>>()?;
            let mut infos = Vec::new();
            for (name, record) in self.store.all()?.records {
                let candidate = Candidate {
                    name: &name,
                    parent: &record.parent,
                    kind: record.kind.as_str(),
                    labels: &record.labels,
                };
                if any_matches(&filters, &candidate) {
                    infos.push(Ok(to_info(name, record)));
                }
            }
            Ok::<_, ServiceError>(infos)
        })();
        self.observe("list", started, &result);
        Ok(Box::pin(futures_util::stream::iter(result?)))
    }
}
