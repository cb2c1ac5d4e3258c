/*
 * One engine, eight threads at once: each embeds and generates on the shared engine and checks
 * that it gets exactly (bit for bit, token for token) what one thread alone got. Meanwhile one
 * thread loads and frees a second handle on the encoder (the version must stay loaded for the
 * others) and every thread makes calls that fail and frees their errors.
 *
 *   threads MINILM_DIR SMOLLM2_GGUF [ITERATIONS]
 *
 * Exits 0 when every result matched and every handle was freed; prints what differed otherwise.
 * scripts/test-ffi.sh runs it many times.
 */
#define _POSIX_C_SOURCE 200809L
#include <keel.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 8
#define BATCH 2
#define DIM 384
#define GEN_TOKENS 4

static const char *const TEXTS[] = {
    "A cat sat on the mat.",
    "Stock markets fell sharply on Monday.",
    "The mitochondria is the powerhouse of the cell.",
    "Bonjour, comment allez-vous ?",
};
/* Raw prompts (no chat template): short, so that the test spends its time in the threads. */
static const char *const PROMPTS[] = {"The capital of France is", "One, two, three,"};

static const char *minilm_dir;
static int iterations = 3;
static keel_engine *engine;
static pthread_barrier_t start;
/* Each thread's requests: the response cache bypassed (so that the model runs every time, batched
 * by the scheduler with the other threads' requests), priorities mixed. */
static keel_request_params requests[3];

struct job {
    int index;
    const char *texts[BATCH];
    const char *prompt;
    float expected[BATCH * DIM];
    uint32_t expected_tokens[GEN_TOKENS];
    size_t expected_count;
    int failures;
};

static void fail(struct job *job, const char *what, keel_error *err) {
    fprintf(stderr, "thread %d: %s: %s\n", job->index, what, err ? keel_error_message(err) : "mismatch");
    keel_error_free(err);
    job->failures++;
}

/* Greedy tokens of a prompt; returns how many (at most GEN_TOKENS), or -1 on failure. */
static int generate(const char *prompt, uint32_t *tokens, keel_error **err) {
    keel_generate_params params = keel_generate_default_params();
    params.max_tokens = GEN_TOKENS;
    params.chat = false;
    keel_completion *completion = NULL;
    if (keel_generate(engine, "chat", prompt, &params, NULL, NULL, NULL, &completion, err) != KEEL_OK) return -1;
    size_t n = keel_completion_token_count(completion);
    memcpy(tokens, keel_completion_tokens(completion), n * sizeof *tokens);
    keel_completion_free(completion);
    return (int)n;
}

static void *work(void *arg) {
    struct job *job = arg;
    pthread_barrier_wait(&start);
    for (int it = 0; it < iterations; it++) {
        keel_error *err = NULL;
        float got[BATCH * DIM];
        size_t dim = 0;
        const keel_request_params *request = &requests[job->index % 3];
        if (keel_embed_into(engine, "embed", job->texts, NULL, BATCH, request, got, BATCH * DIM, &dim, &err) != KEEL_OK)
            fail(job, "keel_embed_into", err);
        else if (dim != DIM || memcmp(got, job->expected, sizeof got) != 0)
            fail(job, "embeddings differ from the single-threaded ones", NULL);

        uint32_t tokens[GEN_TOKENS];
        int n = generate(job->prompt, tokens, &err);
        if (n < 0)
            fail(job, "keel_generate", err);
        else if ((size_t)n != job->expected_count || memcmp(tokens, job->expected_tokens, n * sizeof *tokens))
            fail(job, "tokens differ from the single-threaded ones", NULL);

        /* Calls that must fail, concurrently with everything else. */
        keel_embeddings *emb = NULL;
        if (keel_embed(engine, "no-such-model", job->texts, NULL, BATCH, NULL, &emb, &err) != KEEL_ERR_NOT_FOUND)
            fail(job, "an unknown model was not KEEL_ERR_NOT_FOUND", err);
        else
            keel_error_free(err);
        if (keel_embed((keel_engine *)(uintptr_t)0x10, "embed", job->texts, NULL, BATCH, NULL, &emb, &err) !=
            KEEL_ERR_INVALID_ARGUMENT)
            fail(job, "a made-up engine handle was not refused", err);
        else
            keel_error_free(err);

        /* Thread 0 loads and frees a second handle on the encoder, which the others are using. */
        if (job->index == 0) {
            keel_model *again = NULL;
            if (keel_model_load(engine, minilm_dir, NULL, &again, &err) != KEEL_OK)
                fail(job, "keel_model_load", err);
            keel_model_free(again);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MINILM_DIR SMOLLM2_GGUF [ITERATIONS]\n", argv[0]);
        return 2;
    }
    minilm_dir = argv[1];
    if (argc > 3) iterations = atoi(argv[3]);
    keel_error *err = NULL;
    keel_model *minilm = NULL, *smollm = NULL;
    if (keel_engine_new(NULL, &engine, &err) || keel_model_load(engine, argv[1], NULL, &minilm, &err) ||
        keel_model_alias(minilm, "embed", &err) || keel_model_load(engine, argv[2], NULL, &smollm, &err) ||
        keel_model_alias(smollm, "chat", &err)) {
        fprintf(stderr, "setup failed: %s\n", keel_error_message(err));
        return 1;
    }

    for (int p = 0; p < 3; p++) {
        requests[p] = keel_request_default_params();
        requests[p].use_cache = false;
        requests[p].priority = (keel_priority)p; /* KEEL_PRIORITY_LOW, _NORMAL, _HIGH */
    }

    /* What one thread alone gets. */
    static struct job jobs[THREADS];
    for (int t = 0; t < THREADS; t++) {
        struct job *job = &jobs[t];
        job->index = t;
        job->texts[0] = TEXTS[t % 4];
        job->texts[1] = TEXTS[(t + 1) % 4];
        job->prompt = PROMPTS[t % 2];
        if (keel_embed_into(engine, "embed", job->texts, NULL, BATCH, &requests[1], job->expected, BATCH * DIM, NULL,
                            &err)) {
            fprintf(stderr, "reference embedding failed: %s\n", keel_error_message(err));
            return 1;
        }
        int n = generate(job->prompt, job->expected_tokens, &err);
        if (n < 0) {
            fprintf(stderr, "reference generation failed: %s\n", keel_error_message(err));
            return 1;
        }
        job->expected_count = (size_t)n;
    }

    pthread_t threads[THREADS];
    pthread_barrier_init(&start, NULL, THREADS);
    for (int t = 0; t < THREADS; t++) pthread_create(&threads[t], NULL, work, &jobs[t]);
    int failures = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
        failures += jobs[t].failures;
    }
    pthread_barrier_destroy(&start);

    keel_model_free(smollm);
    keel_model_free(minilm);
    keel_engine_free(engine);
    size_t live = keel_debug_live_handles();
    if (live != 0) {
        fprintf(stderr, "%zu handles still live after everything was freed\n", live);
        failures++;
    }
    printf("%d threads x %d iterations on one engine: %s\n", THREADS, iterations,
           failures ? "FAILED" : "every result equal to the single-threaded one");
    return failures ? 1 : 0;
}
