"""Python bindings for libkeel through ctypes: no compiled extension, only the shared library.

    import keel
    with keel.Engine() as engine:
        minilm = engine.load("models/all-MiniLM-L6-v2")
        vectors = engine.embed(minilm.id, ["first text", "second"])
        smollm = engine.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        reply = engine.generate(smollm.id, "Hello!", max_tokens=32, on_token=print)

With a store (a folder), the engine has a model registry and keeps the lineage of every
prediction made through infer_embed / infer_generate:

    with keel.Engine(storage_path="/var/lib/app/keel") as engine:
        v1 = engine.register("embed", "models/all-MiniLM-L6-v2", weights=keel.WEIGHTS_F32)
        engine.set_alias("embed", "production", v1, reason="first release")
        answer = engine.infer_embed("embed", ["first text"], key="tenant-7")
        print(answer.route, answer.version, engine.lineage_show(answer.request_id))

The library is found at $KEEL_LIBRARY (a path to libkeel.so), else in this repository's
target/release/, else wherever the system's loader finds `libkeel`. Every failed call raises
KeelError with the C status code and message. The declarations below follow include/keel.h.
"""

import ctypes
import ctypes.util
import json
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_bool,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)

ABI_VERSION = 2

# keel_status
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_NOT_FOUND = 2
ERR_INVALID_MODEL = 3
ERR_NO_DEVICE = 4
ERR_OVERLOADED = 5
ERR_DEADLINE = 6
ERR_CONTRACT = 7
ERR_INTERNAL = 8
ERR_SHUTTING_DOWN = 9
ERR_STORAGE = 10
ERR_REVIEW = 11
ERR_BUDGET = 12

# keel_device
DEVICE_BEST, DEVICE_CPU, DEVICE_WGPU, DEVICE_CUDA = 0, 1, 2, 3
# keel_weights
WEIGHTS_QUANTIZED, WEIGHTS_F32, WEIGHTS_INT8 = 0, 1, 2
# keel_priority
PRIORITY_LOW, PRIORITY_NORMAL, PRIORITY_HIGH = 0, 1, 2
# keel_finish_reason
FINISH_REASONS = {0: "stop", 1: "length", 2: "context_full", 3: "cancelled"}


class EngineParams(Structure):
    _fields_ = [
        ("device", c_uint32),
        ("threads", c_uint32),
        ("storage_path", c_char_p),
        ("max_batch_size", c_uint32),
        ("max_queue_delay_us", c_uint32),
        ("queue_capacity", c_uint32),
        ("max_streams", c_uint32),
        ("response_cache_bytes", c_uint64),
        ("prefix_cache_bytes", c_uint64),
    ]


class RequestParams(Structure):
    _fields_ = [("priority", c_uint32), ("deadline_ms", c_uint32), ("use_cache", c_bool)]


class RequestInfo(Structure):
    _fields_ = [("request_id", c_char_p), ("key", c_char_p), ("params", POINTER(RequestParams))]


class ModelParams(Structure):
    _fields_ = [("weights", c_uint32)]


class GenerateParams(Structure):
    _fields_ = [
        ("max_tokens", c_uint32),
        ("temperature", c_float),
        ("top_k", c_uint32),
        ("top_p", c_float),
        ("seed", c_uint64),
        ("chat", c_bool),
        ("system", c_char_p),
    ]


TOKEN_CALLBACK = CFUNCTYPE(c_bool, c_void_p, c_uint32, c_void_p, c_size_t)


def _find_library():
    path = os.environ.get("KEEL_LIBRARY")
    if path:
        return path
    here = os.path.dirname(os.path.abspath(__file__))
    local = os.path.join(here, "..", "..", "target", "release", "libkeel.so")
    if os.path.exists(local):
        return local
    found = ctypes.util.find_library("keel")
    if not found:
        raise OSError("libkeel not found: build it with `cargo build --release -p keel-cli -p keel-ffi` or set KEEL_LIBRARY")
    return found


lib = ctypes.CDLL(_find_library())

_P = c_void_p  # every handle is an opaque pointer
_PP = POINTER(c_void_p)
_SIGNATURES = {
    "keel_abi_version": (c_uint32, []),
    "keel_version": (c_char_p, []),
    "keel_error_code": (c_int32, [_P]),
    "keel_error_message": (c_char_p, [_P]),
    "keel_error_free": (None, [_P]),
    "keel_status_name": (c_char_p, [c_int32]),
    "keel_engine_default_params": (EngineParams, []),
    "keel_engine_new": (c_int32, [POINTER(EngineParams), _PP, _PP]),
    "keel_engine_free": (None, [_P]),
    "keel_engine_device": (c_int32, [_P, POINTER(c_uint32), _PP]),
    "keel_engine_shutdown": (c_int32, [_P, c_uint32, POINTER(c_bool), _PP]),
    "keel_engine_models": (c_int32, [_P, _PP, _PP]),
    "keel_engine_stats": (c_int32, [_P, c_char_p, _PP, _PP]),
    "keel_model_default_params": (ModelParams, []),
    "keel_model_load": (c_int32, [_P, c_char_p, POINTER(ModelParams), _PP, _PP]),
    "keel_model_free": (None, [_P]),
    "keel_model_id": (c_char_p, [_P]),
    "keel_model_name": (c_char_p, [_P]),
    "keel_model_architecture": (c_char_p, [_P]),
    "keel_model_alias": (c_int32, [_P, c_char_p, _PP]),
    "keel_request_default_params": (RequestParams, []),
    "keel_request_default_info": (RequestInfo, []),
    "keel_registry_register": (c_int32, [_P, c_char_p, c_char_p, c_uint32, c_bool, _PP, _PP]),
    "keel_registry_alias": (c_int32, [_P, c_char_p, c_char_p, c_char_p, c_char_p, _PP]),
    "keel_registry_canary": (c_int32, [_P, c_char_p, c_char_p, c_double, c_bool, c_char_p, _PP]),
    "keel_registry_promote": (c_int32, [_P, c_char_p, c_char_p, _PP]),
    "keel_registry_rollback": (c_int32, [_P, c_char_p, c_char_p, _PP]),
    "keel_registry_abort_canary": (c_int32, [_P, c_char_p, c_char_p, _PP]),
    "keel_registry_list": (c_int32, [_P, _PP, _PP]),
    "keel_registry_history": (c_int32, [_P, c_char_p, _PP, _PP]),
    "keel_embed": (
        c_int32, [_P, c_char_p, POINTER(c_char_p), POINTER(c_size_t), c_size_t, POINTER(RequestParams), _PP, _PP]
    ),
    "keel_embed_into": (
        c_int32,
        [_P, c_char_p, POINTER(c_char_p), POINTER(c_size_t), c_size_t, POINTER(RequestParams), POINTER(c_float),
         c_size_t, POINTER(c_size_t), _PP],
    ),
    "keel_embeddings_count": (c_size_t, [_P]),
    "keel_embeddings_dim": (c_size_t, [_P]),
    "keel_embeddings_data": (POINTER(c_float), [_P]),
    "keel_embeddings_model_id": (c_char_p, [_P]),
    "keel_infer_embed": (
        c_int32, [_P, c_char_p, POINTER(c_char_p), POINTER(c_size_t), c_size_t, POINTER(RequestInfo), _PP, _PP]
    ),
    "keel_embeddings_request_id": (c_char_p, [_P]),
    "keel_embeddings_route": (c_char_p, [_P]),
    "keel_embeddings_free": (None, [_P]),
    "keel_generate_default_params": (GenerateParams, []),
    "keel_generate": (
        c_int32,
        [_P, c_char_p, c_char_p, POINTER(GenerateParams), POINTER(RequestParams), TOKEN_CALLBACK, c_void_p, _PP,
         _PP],
    ),
    "keel_completion_text": (c_void_p, [_P]),
    "keel_completion_text_len": (c_size_t, [_P]),
    "keel_completion_token_count": (c_size_t, [_P]),
    "keel_completion_tokens": (POINTER(c_uint32), [_P]),
    "keel_completion_prompt_token_count": (c_size_t, [_P]),
    "keel_completion_finish_reason": (c_int32, [_P]),
    "keel_completion_free": (None, [_P]),
    "keel_infer_generate": (
        c_int32, [_P, c_char_p, c_char_p, POINTER(GenerateParams), POINTER(RequestInfo), _PP, _PP]
    ),
    "keel_completion_request_id": (c_char_p, [_P]),
    "keel_completion_route": (c_char_p, [_P]),
    "keel_completion_model_id": (c_char_p, [_P]),
    "keel_lineage_show": (c_int32, [_P, c_char_p, _PP, _PP]),
    "keel_lineage_recent": (c_int32, [_P, c_size_t, _PP, _PP]),
    "keel_lineage_flush": (c_int32, [_P, _PP]),
    "keel_lineage_replay": (c_int32, [_P, c_char_p, POINTER(c_bool), _PP]),
    "keel_review_list": (c_int32, [_P, c_char_p, c_uint32, _PP, _PP]),
    "keel_review_claim": (c_int32, [_P, c_char_p, c_uint64, _PP, _PP]),
    "keel_review_resolve": (c_int32, [_P, c_int64, c_char_p, c_char_p, c_char_p, _PP, _PP]),
    "keel_review_export": (c_int32, [_P, _PP, _PP]),
    "keel_review_stats": (c_int32, [_P, _PP, _PP]),
    "keel_feedback": (c_int32, [_P, c_char_p, c_char_p, _PP]),
    "keel_budget_set": (c_int32, [_P, c_char_p, c_double, c_uint64, c_char_p, _PP]),
    "keel_budget_spend": (c_int32, [_P, c_char_p, _PP, _PP]),
    "keel_cost_report": (c_int32, [_P, _PP, _PP]),
    "keel_classify": (c_int32, [_P, c_char_p, c_char_p, _PP, _PP]),
    "keel_drift_state": (c_int32, [_P, c_char_p, _PP, _PP]),
    "keel_metrics_text": (c_int32, [_P, _PP, _PP]),
    "keel_string_data": (c_void_p, [_P]),
    "keel_string_len": (c_size_t, [_P]),
    "keel_string_free": (None, [_P]),
    "keel_debug_panic": (c_int32, [_PP]),
    "keel_debug_live_handles": (c_size_t, []),
}
for _name, (_restype, _argtypes) in _SIGNATURES.items():
    _f = getattr(lib, _name)
    _f.restype = _restype
    _f.argtypes = _argtypes

if lib.keel_abi_version() != ABI_VERSION:
    raise ImportError(f"keel.py speaks ABI {ABI_VERSION} but the libkeel it loaded is ABI {lib.keel_abi_version()}")


class KeelError(Exception):
    """A failed libkeel call: `code` is the keel_status, `status` its name."""

    def __init__(self, code, message):
        self.code = code
        self.status = lib.keel_status_name(code).decode()
        self.message = message
        super().__init__(f"{self.status}: {message}")


def _call(function, *args):
    """Calls a libkeel function whose last parameter is `keel_error **err`; raises on failure."""
    err = c_void_p()
    code = function(*args, byref(err))
    if code != OK:
        message = lib.keel_error_message(err).decode("utf-8", "replace")
        lib.keel_error_free(err)
        raise KeelError(code, message)


def _bytes(text):
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _request(priority, deadline_ms, use_cache):
    request = lib.keel_request_default_params()
    if priority is not None:
        request.priority = priority
    request.deadline_ms, request.use_cache = deadline_ms, use_cache
    return request


def _info(request_id, key, request):
    """A keel_request_info; it holds references to the bytes and the request it points at."""
    info = lib.keel_request_default_info()
    info.request_id = None if request_id is None else _bytes(request_id)
    info.key = None if key is None else _bytes(key)
    info.params = ctypes.pointer(request)
    return info


def _optional(text):
    return None if text is None else _bytes(text)


def _decode(pointer):
    return None if pointer is None else pointer.decode()


def _take_string(out):
    """The text of a keel_string, which is freed."""
    try:
        return ctypes.string_at(lib.keel_string_data(out), lib.keel_string_len(out)).decode()
    finally:
        lib.keel_string_free(out)


class Model:
    """A model version loaded into an engine (a keel_model handle)."""

    def __init__(self, handle):
        self._handle = handle
        self.id = lib.keel_model_id(handle).decode()
        self.name = lib.keel_model_name(handle).decode()
        self.architecture = lib.keel_model_architecture(handle).decode()

    def alias(self, name):
        """Points the engine's alias `name` at this model's version."""
        _call(lib.keel_model_alias, self._handle, _bytes(name))

    def free(self):
        """Frees the handle; the version is unloaded with its last handle. Safe to call twice."""
        lib.keel_model_free(self._handle)


class Completion:
    """A finished generation. From infer_generate, also its request_id, route and version (None
    from generate, and route None on an engine without a store)."""

    def __init__(self, text, tokens, finish, prompt_tokens, request_id=None, route=None, version=None):
        self.text, self.tokens, self.finish, self.prompt_tokens = text, tokens, finish, prompt_tokens
        self.request_id, self.route, self.version = request_id, route, version

    def __repr__(self):
        return f"Completion(text={self.text!r}, tokens={len(self.tokens)}, finish={self.finish!r})"


class Answer:
    """The answer of infer_embed: the vectors, the request's id, the route the version layer
    chose (None on an engine without a store) and the version id that answered."""

    def __init__(self, vectors, request_id, route, version):
        self.vectors, self.request_id, self.route, self.version = vectors, request_id, route, version

    def __repr__(self):
        return (f"Answer({len(self.vectors)} vectors, request_id={self.request_id!r}, route={self.route!r}, "
                f"version={self.version[:12]!r})")


def _completion(out):
    """A Completion of a keel_completion, which is freed."""
    try:
        n = lib.keel_completion_token_count(out)
        tokens = lib.keel_completion_tokens(out)[:n] if n else []
        text = ctypes.string_at(lib.keel_completion_text(out), lib.keel_completion_text_len(out)).decode()
        return Completion(text, tokens, FINISH_REASONS[lib.keel_completion_finish_reason(out)],
                          lib.keel_completion_prompt_token_count(out), _decode(lib.keel_completion_request_id(out)),
                          _decode(lib.keel_completion_route(out)), _decode(lib.keel_completion_model_id(out)))
    finally:
        lib.keel_completion_free(out)


def _generate_params(max_tokens, temperature, top_k, top_p, seed, chat, system):
    params = lib.keel_generate_default_params()
    params.max_tokens, params.temperature, params.top_k = max_tokens, temperature, top_k
    params.top_p, params.seed, params.chat = top_p, seed, chat
    params.system = None if system is None else _bytes(system)
    return params


class Engine:
    """An engine (a keel_engine handle). Use it as a context manager, or call close().

    Keyword arguments set the fields of keel_engine_params of the same names (max_batch_size,
    queue_capacity, max_streams, response_cache_bytes, ...). storage_path (a folder, str or bytes)
    gives the engine a store: the registry, lineage, the review queue and feedback, and the
    NAME / NAME@ALIAS addressing of infer_embed, infer_generate and classify."""

    def __init__(self, device=DEVICE_CPU, **options):
        params = lib.keel_engine_default_params()
        params.device = device
        for name, value in options.items():
            if name not in dict(EngineParams._fields_):
                raise TypeError(f"keel_engine_params has no field {name!r}")
            if name == "storage_path" and value is not None:
                value = os.fsencode(value)
            setattr(params, name, value)
        self._handle = c_void_p()
        _call(lib.keel_engine_new, byref(params), byref(self._handle))

    def close(self):
        """Frees the engine and every model loaded through it. Safe to call twice."""
        lib.keel_engine_free(self._handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def shutdown(self, grace_ms=10_000):
        """Refuses new requests and waits up to grace_ms for those in flight; True if all finished."""
        finished = c_bool()
        _call(lib.keel_engine_shutdown, self._handle, grace_ms, byref(finished))
        return finished.value

    def stats(self, model=None):
        """The counters of the caches, and of `model`'s scheduler when given (keel_engine_stats)."""
        out = c_void_p()
        _call(lib.keel_engine_stats, self._handle, None if model is None else _bytes(model), byref(out))
        try:
            return json.loads(ctypes.string_at(lib.keel_string_data(out), lib.keel_string_len(out)))
        finally:
            lib.keel_string_free(out)

    def device(self):
        out = c_uint32()
        _call(lib.keel_engine_device, self._handle, byref(out))
        return out.value

    def load(self, path, weights=WEIGHTS_QUANTIZED):
        params = lib.keel_model_default_params()
        params.weights = weights
        handle = c_void_p()
        _call(lib.keel_model_load, self._handle, os.fsencode(path), byref(params), byref(handle))
        return Model(handle)

    def models(self):
        """The loaded versions, as keel_engine_models describes them."""
        out = c_void_p()
        _call(lib.keel_engine_models, self._handle, byref(out))
        try:
            return json.loads(ctypes.string_at(lib.keel_string_data(out), lib.keel_string_len(out)))
        finally:
            lib.keel_string_free(out)

    def embed(self, model, texts, priority=None, deadline_ms=0, use_cache=True):
        """Unit-length embeddings of `texts` (str or bytes), as lists of floats."""
        data = [_bytes(t) for t in texts]
        pointers = (c_char_p * len(data))(*data)
        lengths = (c_size_t * len(data))(*[len(d) for d in data])
        request = _request(priority, deadline_ms, use_cache)
        out = c_void_p()
        _call(lib.keel_embed, self._handle, _bytes(model), pointers, lengths, len(data), byref(request), byref(out))
        try:
            count, dim = lib.keel_embeddings_count(out), lib.keel_embeddings_dim(out)
            flat = lib.keel_embeddings_data(out)[: count * dim]
            return [flat[i * dim:(i + 1) * dim] for i in range(count)]
        finally:
            lib.keel_embeddings_free(out)

    def generate(self, model, prompt, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, seed=0, chat=True,
                 system=None, on_token=None, priority=None, deadline_ms=0):
        """Generates a reply. `on_token(text)` is called with each token's text as it comes; it may
        return False to stop. An exception in it stops the generation and is raised here."""
        params = _generate_params(max_tokens, temperature, top_k, top_p, seed, chat, system)
        request = _request(priority, deadline_ms, True)
        raised = []

        def trampoline(_user_data, _token_id, text, length):
            try:
                return on_token(ctypes.string_at(text, length).decode()) is not False
            except BaseException as e:  # noqa: BLE001 - handed back to the caller below
                raised.append(e)
                return False

        callback = TOKEN_CALLBACK(trampoline) if on_token else TOKEN_CALLBACK()
        out = c_void_p()
        _call(lib.keel_generate, self._handle, _bytes(model), _bytes(prompt), byref(params), byref(request), callback,
              None, byref(out))
        if raised:
            lib.keel_completion_free(out)
            raise raised[0]
        return _completion(out)

    # The one prediction path: request ids, routing keys, and (with a store) the version layer.

    def infer_embed(self, model, texts, request_id=None, key=None, priority=None, deadline_ms=0, use_cache=True):
        """Embeds `texts` on the one prediction path (keel_infer_embed). With a store, `model` is
        NAME, NAME@ALIAS or a version id, and a lineage record is kept. Returns an Answer."""
        data = [_bytes(t) for t in texts]
        pointers = (c_char_p * len(data))(*data)
        lengths = (c_size_t * len(data))(*[len(d) for d in data])
        info = _info(request_id, key, _request(priority, deadline_ms, use_cache))
        out = c_void_p()
        _call(lib.keel_infer_embed, self._handle, _bytes(model), pointers, lengths, len(data), byref(info), byref(out))
        try:
            count, dim = lib.keel_embeddings_count(out), lib.keel_embeddings_dim(out)
            flat = lib.keel_embeddings_data(out)[: count * dim]
            return Answer([flat[i * dim:(i + 1) * dim] for i in range(count)],
                          _decode(lib.keel_embeddings_request_id(out)), _decode(lib.keel_embeddings_route(out)),
                          _decode(lib.keel_embeddings_model_id(out)))
        finally:
            lib.keel_embeddings_free(out)

    def infer_generate(self, model, prompt, request_id=None, key=None, max_tokens=256, temperature=0.0, top_k=0,
                       top_p=1.0, seed=0, chat=True, system=None, priority=None, deadline_ms=0):
        """Generates a reply to its end on the one prediction path (keel_infer_generate): a
        Completion with request_id, route and version."""
        params = _generate_params(max_tokens, temperature, top_k, top_p, seed, chat, system)
        info = _info(request_id, key, _request(priority, deadline_ms, True))
        out = c_void_p()
        _call(lib.keel_infer_generate, self._handle, _bytes(model), _bytes(prompt), byref(params), byref(info),
              byref(out))
        return _completion(out)

    # The registry (an engine with a store only).

    def register(self, name, path, weights=WEIGHTS_QUANTIZED, retain_input=False):
        """Registers the model at `path` as a version of `name`; returns its version id."""
        out = c_void_p()
        _call(lib.keel_registry_register, self._handle, _bytes(name), os.fsencode(path), weights, retain_input,
              byref(out))
        return _take_string(out)

    def set_alias(self, name, alias, version, reason=None):
        """Points `alias` of `name` at `version` (an id or a unique prefix of 8+ hex digits)."""
        _call(lib.keel_registry_alias, self._handle, _bytes(name), _bytes(alias), _bytes(version), _optional(reason))

    def canary(self, name, version, percent, shadow=False, reason=None):
        """Makes `version` the canary of `name` with `percent` (0-100) of the traffic, sticky by key."""
        _call(lib.keel_registry_canary, self._handle, _bytes(name), _bytes(version), float(percent), shadow,
              _optional(reason))

    def promote(self, name, reason=None):
        """Makes the canary of `name` its production version."""
        _call(lib.keel_registry_promote, self._handle, _bytes(name), _optional(reason))

    def rollback(self, name, reason=None):
        """Returns production of `name` to the version it replaced."""
        _call(lib.keel_registry_rollback, self._handle, _bytes(name), _optional(reason))

    def abort_canary(self, name, reason=None):
        """Ends the canary of `name`: production takes all the traffic."""
        _call(lib.keel_registry_abort_canary, self._handle, _bytes(name), _optional(reason))

    def versions(self):
        """The registered versions and the aliases pointing at them (keel_registry_list)."""
        out = c_void_p()
        _call(lib.keel_registry_list, self._handle, byref(out))
        return json.loads(_take_string(out))

    def history(self, name):
        """The alias moves of `name`, oldest first (keel_registry_history)."""
        out = c_void_p()
        _call(lib.keel_registry_history, self._handle, _bytes(name), byref(out))
        return json.loads(_take_string(out))

    # Lineage (an engine with a store only).

    def lineage_show(self, request_id):
        """The lineage record of a request, as a dict (keel_lineage_show)."""
        out = c_void_p()
        _call(lib.keel_lineage_show, self._handle, _bytes(request_id), byref(out))
        return json.loads(_take_string(out))

    def lineage_recent(self, n=20):
        """The newest `n` lineage records, newest first."""
        out = c_void_p()
        _call(lib.keel_lineage_recent, self._handle, n, byref(out))
        return json.loads(_take_string(out))

    def lineage_flush(self):
        """Waits until the records of every request answered so far are committed."""
        _call(lib.keel_lineage_flush, self._handle)

    def lineage_replay(self, request_id):
        """Runs a recorded request again; True if the output is the recorded one bit for bit."""
        identical = c_bool()
        _call(lib.keel_lineage_replay, self._handle, _bytes(request_id), byref(identical))
        return identical.value

    # Review queue and feedback (an engine with a store only); budgets and cost (any engine).

    def review_list(self, state=None, limit=0):
        """Review tickets in `state` ("pending", "claimed", "resolved", "expired"; None: all), oldest
        first, at most `limit` (0: all) (keel_review_list)."""
        out = c_void_p()
        _call(lib.keel_review_list, self._handle, _optional(state), limit, byref(out))
        return json.loads(_take_string(out))

    def review_claim(self, reviewer, lease_ms=900_000):
        """The oldest pending ticket, leased to `reviewer`; None if none is pending."""
        out = c_void_p()
        _call(lib.keel_review_claim, self._handle, _bytes(reviewer), lease_ms, byref(out))
        return json.loads(_take_string(out))

    def review_resolve(self, ticket, reviewer, label, comment=None):
        """Labels a ticket; returns it resolved. Closed or claimed by another reviewer: KeelError
        ERR_INVALID_ARGUMENT; unknown: ERR_NOT_FOUND (keel_review_resolve)."""
        out = c_void_p()
        _call(lib.keel_review_resolve, self._handle, ticket, _bytes(reviewer), _bytes(label), _optional(comment),
              byref(out))
        return json.loads(_take_string(out))

    def review_export(self):
        """Every label as JSON lines, for retraining (keel_review_export)."""
        out = c_void_p()
        _call(lib.keel_review_export, self._handle, byref(out))
        return _take_string(out)

    def review_stats(self):
        """Accuracy (ground truth) and reviewer agreement per version (keel_review_stats)."""
        out = c_void_p()
        _call(lib.keel_review_stats, self._handle, byref(out))
        return json.loads(_take_string(out))

    def feedback(self, request_id, label):
        """Ground truth for the prediction `request_id` (keel_feedback)."""
        _call(lib.keel_feedback, self._handle, _bytes(request_id), _bytes(label))

    def set_budget(self, key, limit, period_ms=0, downgrade_to=None):
        """At most `limit` per `period_ms` (0: in all) for the routing key `key` ("" for requests
        without one); at exhaustion refused with ERR_BUDGET, or served by `downgrade_to`."""
        _call(lib.keel_budget_set, self._handle, _bytes(key), float(limit), period_ms, _optional(downgrade_to))

    def budget_spend(self, key):
        """{"limit", "spent", "reserved", "left"} of `key`'s budget, or None (keel_budget_spend)."""
        out = c_void_p()
        _call(lib.keel_budget_spend, self._handle, _bytes(key), byref(out))
        return json.loads(_take_string(out))

    def cost_report(self):
        """What this engine's answers cost, per model, version and key (keel_cost_report)."""
        out = c_void_p()
        _call(lib.keel_cost_report, self._handle, byref(out))
        return json.loads(_take_string(out))

    # Tabular classification, drift and metrics.

    def classify(self, model, rows):
        """Classifies rows (a dict of field values, or a list of them) with a tabular model, as one
        request; returns {"request_id", "classes": [{"class", "probabilities"}], "contract": verdict}.
        A row that breaks a contract clause whose action is reject raises KeelError with code
        ERR_CONTRACT, naming the field, the clause and the value (keel_classify)."""
        out = c_void_p()
        _call(lib.keel_classify, self._handle, _bytes(model), _bytes(json.dumps(rows)), byref(out))
        return json.loads(_take_string(out))

    def drift(self, model):
        """The drift state of a model with a reference profile: {"state", "last", "reports"}
        (keel_drift_state)."""
        out = c_void_p()
        _call(lib.keel_drift_state, self._handle, _bytes(model), byref(out))
        return json.loads(_take_string(out))

    def metrics(self):
        """Everything observed, in Prometheus text format (keel_metrics_text)."""
        out = c_void_p()
        _call(lib.keel_metrics_text, self._handle, byref(out))
        return _take_string(out)


def live_handles():
    """How many libkeel handles are live in the process (0 once everything is freed)."""
    return lib.keel_debug_live_handles()
