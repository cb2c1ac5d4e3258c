//! Serving: each request is routed, answered by the layers below (whole or streamed), fed to
//! the canary's guard, copied to the shadow, and recorded in lineage.

use super::lineage::{LineageRecord, OutputSummary, RecordedInput, StageTimes};
use super::routes::Decision;
use super::shadow::{InFlight, ShadowJob};
use super::slots::Slot;
use super::{Shared, Versioned, CANARY};
use crate::store::LineageRow;
use crate::{
    FinishReason, Generating, Infer, InferRequest, InferResponse, InferStream, Input, Note, Output, Received,
    RequestId, Result, Step, Target,
};
use std::sync::Arc;
use std::time::Instant;

/// The route a request took (`production`, `canary`, an alias, `direct`) and why: noted on the
/// request for the layers below, and so on its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The route.
    pub route: String,
    /// Why.
    pub reason: String,
}

impl Note for Route {
    fn key(&self) -> &'static str {
        "route"
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"route": self.route, "reason": self.reason})
    }
}

/// Noted on a request: keep its input in its lineage record whatever its version's retention
/// setting, so that it can be replayed (`keel --retain-input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainInput;

impl Note for RetainInput {
    fn key(&self) -> &'static str {
        "retain_input"
    }

    fn to_json(&self) -> serde_json::Value {
        true.into()
    }
}

impl Infer for Versioned {
    /// The version a request for `model` goes to now (`NAME`, `NAME@ALIAS`, a version id; a
    /// canary split draws as for a request without a key).
    fn target(&self, model: &str) -> Result<Target> {
        Ok(self.shared.decide(model, None)?.slot.target())
    }

    /// Routes the request (`NAME`, `NAME@ALIAS` or a version id), answers it on the version
    /// chosen, queues shadow copies, feeds the canary guard, and records its lineage. The answer
    /// carries the [`Route`]; `meta.model` is the model's name.
    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        let _busy = self.shared.traffic.begin();
        let started = Instant::now();
        let d = self.shared.decide(&request.model, request.key.as_deref())?;
        let (request, asked) = routed(request, &d);
        let result = self.shared.below.infer(request);
        self.shared.conclude(&d, asked, result, started)
    }

    /// [`Infer::infer`], streamed: routed the same way, recorded when the generation ends (or
    /// is cancelled: its record says so and holds what was generated); shadow copies run then.
    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        let busy = self.shared.traffic.begin();
        let started = Instant::now();
        let d = self.shared.decide(&request.model, request.key.as_deref())?;
        let (request, asked) = routed(request, &d);
        let inner = match self.shared.below.infer_stream(request) {
            Ok(inner) => inner,
            Err(e) => {
                if let Some(guard) = &d.guard {
                    guard.observe(d.route == CANARY, false, started.elapsed());
                }
                return Err(e);
            }
        };
        let mut meta = inner.meta().clone();
        meta.model = d.name.clone();
        Ok(InferStream::new(
            meta,
            Served {
                inner,
                layer: self.clone(),
                asked: Some(asked),
                decision: d,
                started,
                _busy: busy,
            },
        ))
    }
}

/// What the version layer keeps of a request while the layers below answer it: what its lineage
/// record and a shadow copy need. The input is the one copy the stack makes, shared with the
/// layers below ([`Received`]): a layer below may repair the request's own.
pub(super) struct Asked {
    pub id: RequestId,
    pub key: Option<String>,
    /// The model as the caller named it.
    pub model: String,
    pub options: crate::Request,
    pub retain: bool,
    pub input: Arc<Input>,
}

impl Asked {
    pub(super) fn of(request: &InferRequest, input: Arc<Input>) -> Self {
        Self {
            id: request.id.clone(),
            key: request.key.clone(),
            model: request.model.clone(),
            options: request.options.clone(),
            retain: request.notes.get::<RetainInput>().is_some(),
            input,
        }
    }

    /// The request again (a shadow copy of it).
    pub(super) fn request(&self) -> InferRequest {
        InferRequest::new(&self.model, (*self.input).clone())
            .id(self.id.clone())
            .options(self.options.clone())
            .with_key(self.key.clone())
    }
}

/// The request as the layers below see it (addressed to the version chosen, with its route and
/// the input as received), and what this layer keeps of it.
fn routed(mut request: InferRequest, d: &Decision) -> (InferRequest, Asked) {
    let received = Arc::new(request.input.clone());
    let asked = Asked::of(&request, received.clone());
    request.model = d.slot.record.id.to_string();
    request.target = Some(d.slot.target());
    request.notes.insert(Route {
        route: d.route.clone(),
        reason: d.reason.clone(),
    });
    request.notes.insert(Received(received));
    (request, asked)
}

/// A generation served by the version layer. It holds the version it was routed to until it
/// ends.
struct Served {
    inner: InferStream,
    layer: Versioned,
    /// Until the end, when the lineage record takes it.
    asked: Option<Asked>,
    decision: Decision,
    started: Instant,
    /// Production traffic in flight until the stream ends (shadow copies wait).
    _busy: InFlight,
}

impl Generating for Served {
    fn step(&mut self) -> Step {
        match (self.inner.step(), self.asked.take()) {
            (Step::End(result), Some(asked)) => Step::End(self.layer.shared.conclude(
                &self.decision,
                asked,
                result,
                self.started,
            )),
            (step, asked) => {
                self.asked = asked;
                step
            }
        }
    }

    fn cancel(mut self: Box<Self>) -> Result<InferResponse> {
        let partial = self.inner.cancel();
        match self.asked.take() {
            Some(asked) => self
                .layer
                .shared
                .conclude(&self.decision, asked, partial, self.started),
            None => partial,
        }
    }
}

impl Shared {
    /// After an answer: the guard's figures, the model's name on the answer, the lineage record,
    /// a shadow copy, and a rollback if the guard tripped.
    pub(super) fn conclude(
        self: &std::sync::Arc<Self>,
        d: &Decision,
        asked: Asked,
        result: Result<InferResponse>,
        started: Instant,
    ) -> Result<InferResponse> {
        if let Some(guard) = &d.guard {
            guard.observe(d.route == CANARY, result.is_ok(), started.elapsed());
        }
        let mut answer = result?;
        answer.meta.model = d.name.clone();
        let cancelled =
            matches!(&answer.output, Output::Completion(c) if c.finish == FinishReason::Cancelled);
        let other = match (&d.shadow, &d.compare) {
            _ if cancelled => None,
            (Some(canary), _) => Some((canary, true)),
            (None, Some(production)) => Some((production, false)),
            (None, None) => None,
        };
        if let Some((slot, recorded)) = other {
            self.shadow.offer(ShadowJob {
                request: asked.request(),
                addressed: asked.model.clone(),
                original: answer.output.clone(),
                slot: slot.clone(),
                name: d.name.clone(),
                guard: d.guard.clone(),
                recorded,
                queued: Instant::now(),
            });
        }
        let commit = self.record(
            asked, &answer, &d.slot, &d.name, &d.route, &d.reason, None, started,
        );
        if let Some(guard) = &d.guard {
            if let Some(why) = guard.tripped() {
                let layer = Versioned { shared: self.clone() };
                let _ = layer.abort_canary(&d.name, &format!("guard: {why}"));
            }
        }
        // On a store that hosts share, an answer is given only once its record is committed.
        if let Some(commit) = commit {
            commit.wait()?;
        }
        Ok(answer)
    }

    /// The lineage record of an answer: what answered and why, and every layer's notes (the
    /// contract's verdict, the price and the review decision in fields of their own). The
    /// request's thread hands over the request and a copy of the output; the record is made
    /// (the input hashed, the output summed up, the JSON written) on the writer's thread.
    /// Returns the record's commit to wait for, when the writer is durable.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record(
        &self,
        asked: Asked,
        answer: &InferResponse,
        slot: &Slot,
        name: &str,
        route: &str,
        reason: &str,
        shadow_of: Option<(&str, f64)>,
        started: Instant,
    ) -> Option<super::lineage::Commit> {
        let meta = &answer.meta;
        let retain = asked.retain || slot.record.retain_input;
        let (output, notes, identity) = (answer.output.clone(), meta.notes.clone(), slot.identity.clone());
        let request_id = match shadow_of {
            Some((of, _)) => format!("{of}.shadow"),
            None => asked.id.to_string(),
        };
        let time = crate::store::now_ms();
        let timings_us = StageTimes::of(&meta.timings, started.elapsed());
        let (version, weights) = (slot.record.id.to_string(), slot.record.weights.clone());
        let (backend, batch_id, cache_hit) = (meta.backend.clone(), meta.batch_id, meta.cache_hit);
        let (model, route, route_reason) = (name.to_string(), route.to_string(), reason.to_string());
        let shadow_of = shadow_of.map(|(of, d)| (of.to_string(), d));
        self.lineage.submit(Box::new(move || {
            // Only a retained input is copied into the record; else its hash is written from it.
            let recorded = retain.then(|| RecordedInput::of(&asked.input));
            let input_hash = match &recorded {
                Some(r) => r.hash(),
                None => RecordedInput::hash_of(&asked.input),
            };
            let mut notes = notes.to_json();
            for said_elsewhere in ["route", "retain_input"] {
                notes.remove(said_elsewhere);
            }
            let record = LineageRecord {
                request_id,
                time,
                key: asked.key,
                model,
                addressed: asked.model,
                version,
                weights,
                files: identity.files.clone(),
                manifest_hash: identity.manifest_hash.clone(),
                keel_version: env!("CARGO_PKG_VERSION").to_string(),
                backend,
                batch_id,
                cache_hit,
                route,
                route_reason,
                divergence: shadow_of.as_ref().map(|(_, d)| *d),
                shadow_of: shadow_of.map(|(of, _)| of),
                input_hash,
                input: recorded,
                output: OutputSummary::of(&output),
                timings_us,
                contract: notes.remove("contract"),
                review: notes.remove("review"),
                cost: notes.remove("cost"),
                notes,
            };
            LineageRow {
                request_id: record.request_id.clone(),
                time_ms: record.time,
                record: serde_json::to_string(&record).unwrap_or_default(),
            }
        }))
    }
}
