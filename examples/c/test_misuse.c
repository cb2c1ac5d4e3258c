/*
 * Misuse of the C API gets an error code, never a crash: NULL handles and buffers, wrong lengths,
 * invalid UTF-8, freed and made-up handles, calls after the engine was freed, a forced panic.
 * Also one real embedding and a short generation, so that a run under valgrind covers the paths
 * that do work. Ends by checking that no handle is left live.
 *
 *   test_misuse MINILM_DIR SMOLLM2_GGUF
 *
 * Exits 0 when every check passed. scripts/test-ffi.sh runs it natively and under valgrind.
 */
#include <keel.h>

#include <stdio.h>
#include <string.h>

static int checks, failures;

#define EXPECT(cond)                                                                               \
    do {                                                                                           \
        checks++;                                                                                  \
        if (!(cond)) {                                                                             \
            failures++;                                                                            \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);                    \
        }                                                                                          \
    } while (0)

/* Runs `call` (which takes `&err`), expects `code`, checks and frees the error. */
#define EXPECT_CODE(code, call)                                                                    \
    do {                                                                                           \
        keel_error *err = (keel_error *)(uintptr_t)0xdeadbeef;                                     \
        keel_status got = (call);                                                                  \
        checks++;                                                                                  \
        if (got != (code) || err == NULL || keel_error_code(err) != (code)) {                      \
            failures++;                                                                            \
            fprintf(stderr, "%s:%d: %s gave %s (%s), expected %s\n", __FILE__, __LINE__, #call,   \
                    keel_status_name(got), keel_error_message(err), #code);                       \
        }                                                                                          \
        keel_error_free(err);                                                                      \
    } while (0)

#define JUNK(type) ((type)(uintptr_t)0xdeadbeef)

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MINILM_DIR SMOLLM2_GGUF\n", argv[0]);
        return 2;
    }
    EXPECT(keel_abi_version() == KEEL_ABI_VERSION);

    /* A forced panic is caught and reported; the library stays usable. */
    EXPECT_CODE(KEEL_ERR_INTERNAL, keel_debug_panic(&err));
    EXPECT(keel_debug_panic(NULL) == KEEL_ERR_INTERNAL);

    /* Engines. */
    keel_engine *engine = JUNK(keel_engine *);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_engine_new(NULL, NULL, &err));
    keel_engine_params params = keel_engine_default_params();
    params.device = 42;
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_engine_new(&params, &engine, &err));
    EXPECT(engine == NULL);
    params.device = KEEL_DEVICE_CUDA;
    EXPECT_CODE(KEEL_ERR_NO_DEVICE, keel_engine_new(&params, &engine, &err));
    EXPECT(keel_engine_new(NULL, &engine, NULL) == KEEL_OK && engine != NULL);

    /* Models. */
    keel_model *model = JUNK(keel_model *);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_load(NULL, argv[1], NULL, &model, &err));
    EXPECT(model == NULL);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_load(engine, NULL, NULL, &model, &err));
    EXPECT_CODE(KEEL_ERR_NOT_FOUND, keel_model_load(engine, "/no/such/model", NULL, &model, &err));
    keel_model_params model_params = keel_model_default_params();
    model_params.weights = 9;
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_load(engine, argv[2], &model_params, &model, &err));
    keel_model *minilm = NULL, *smollm = NULL;
    EXPECT(keel_model_load(engine, argv[1], NULL, &minilm, NULL) == KEEL_OK);
    EXPECT(keel_model_load(engine, argv[2], NULL, &smollm, NULL) == KEEL_OK);
    EXPECT(keel_model_alias(minilm, "embed", NULL) == KEEL_OK);
    EXPECT(keel_model_alias(smollm, "chat", NULL) == KEEL_OK);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_alias(minilm, "", &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_alias(minilm, NULL, &err));
    /* A model handle where an engine is expected. */
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_load((keel_engine *)minilm, argv[1], NULL, &model, &err));

    /* Embeddings: one that works, then every kind of wrong. */
    const char *texts[] = {"Keel is linked into the host.", "A second sentence."};
    keel_embeddings *emb = NULL;
    EXPECT(keel_embed(engine, "embed", texts, NULL, 2, NULL, &emb, NULL) == KEEL_OK);
    EXPECT(keel_embeddings_count(emb) == 2 && keel_embeddings_dim(emb) == 384);
    EXPECT(keel_embeddings_vector(emb, 2) == NULL);
    EXPECT(strlen(keel_embeddings_model_id(emb)) == 64);
    keel_embeddings_free(emb);
    EXPECT(keel_embeddings_count(emb) == 0 && keel_embeddings_data(emb) == NULL); /* freed */
    keel_embeddings_free(emb);                                                    /* double free */

    emb = JUNK(keel_embeddings *);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(NULL, "embed", texts, NULL, 2, NULL, &emb, &err));
    EXPECT(emb == NULL);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, NULL, texts, NULL, 2, NULL, &emb, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", NULL, NULL, 2, NULL, &emb, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", texts, NULL, 0, NULL, &emb, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", texts, NULL, 2, NULL, NULL, &err));
    const char *with_null[] = {"fine", NULL};
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", with_null, NULL, 2, NULL, &emb, &err));
    const char *bad_utf8[] = {"caf\xc3", "ok"};
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", bad_utf8, NULL, 2, NULL, &emb, &err));
    const char *empty[] = {""};
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", empty, NULL, 1, NULL, &emb, &err));
    EXPECT_CODE(KEEL_ERR_NOT_FOUND, keel_embed(engine, "nope", texts, NULL, 2, NULL, &emb, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "chat", texts, NULL, 2, NULL, &emb, &err));
    /* With lengths: bytes need no NUL, and a length that cuts a character in half is invalid UTF-8. */
    const char *cut[] = {"\xc3\xa9t\xc3\xa9"};
    size_t cut_len[] = {1};
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", cut, cut_len, 1, NULL, &emb, &err));

    /* Caller-provided buffers: too short, NULL. */
    float buffer[2 * 384];
    size_t dim = 7;
    memset(buffer, 0, sizeof buffer);
    EXPECT(keel_embed_into(engine, "embed", texts, NULL, 2, NULL, buffer, 2 * 384, &dim, NULL) == KEEL_OK);
    EXPECT(dim == 384 && buffer[0] != 0.0f);
    memset(buffer, 0, sizeof buffer);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed_into(engine, "embed", texts, NULL, 2, NULL, buffer, 2 * 384 - 1, &dim, &err));
    EXPECT(dim == 384 && buffer[0] == 0.0f); /* the dimension is reported, the buffer untouched */
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed_into(engine, "embed", texts, NULL, 2, NULL, buffer, 1, &dim, &err));
    EXPECT(dim == 0);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed_into(engine, "embed", texts, NULL, 2, NULL, NULL, 768, &dim, &err));

    /* Generation: a short one that works, a cancel, then bad input. */
    keel_generate_params gen = keel_generate_default_params();
    gen.max_tokens = 3;
    gen.chat = false; /* a raw prompt of a few tokens: quick, also under valgrind */
    keel_completion *completion = NULL;
    EXPECT(keel_generate(engine, "chat", "Hi!", &gen, NULL, NULL, NULL, &completion, NULL) == KEEL_OK);
    EXPECT(keel_completion_token_count(completion) <= 3 && keel_completion_text(completion) != NULL);
    keel_completion_free(completion);
    EXPECT(keel_completion_text(completion) == NULL); /* freed */
    keel_completion_free(completion);                 /* double free */
    completion = JUNK(keel_completion *);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "chat", NULL, &gen, NULL, NULL, NULL, &completion, &err));
    EXPECT(completion == NULL);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "chat", "", &gen, NULL, NULL, NULL, &completion, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "chat", "caf\xc3", &gen, NULL, NULL, NULL, &completion, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "embed", "Hi!", &gen, NULL, NULL, NULL, &completion, &err));
    EXPECT_CODE(KEEL_ERR_NOT_FOUND, keel_generate(engine, "nope", "Hi!", &gen, NULL, NULL, NULL, &completion, &err));
    gen.temperature = -1.0f;
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "chat", "Hi!", &gen, NULL, NULL, NULL, &completion, &err));
    gen.temperature = 0.5f;
    gen.top_p = 0.0f;
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "chat", "Hi!", &gen, NULL, NULL, NULL, &completion, &err));

    /* Request controls and the system prompt. */
    keel_request_params request = keel_request_default_params();
    request.priority = 99;
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", texts, NULL, 2, &request, &emb, &err));
    request = keel_request_default_params();
    request.use_cache = false;
    request.deadline_ms = 60000;
    request.priority = KEEL_PRIORITY_HIGH;
    EXPECT(keel_embed(engine, "embed", texts, NULL, 2, &request, &emb, NULL) == KEEL_OK);
    keel_embeddings_free(emb);
    gen = keel_generate_default_params();
    gen.max_tokens = 2;
    gen.chat = false;
    gen.system = "caf\xc3";
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "chat", "Hi!", &gen, NULL, NULL, NULL, &completion, &err));
    gen.system = NULL;

    /* Listing and counters. */
    keel_string *stats = NULL;
    EXPECT(keel_engine_stats(engine, "embed", &stats, NULL) == KEEL_OK);
    EXPECT(strstr(keel_string_data(stats), "\"completed\"") != NULL);
    keel_string_free(stats);
    EXPECT_CODE(KEEL_ERR_NOT_FOUND, keel_engine_stats(engine, "nope", &stats, &err));
    EXPECT(stats == NULL);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_engine_stats(engine, NULL, NULL, &err));
    keel_string *listing = NULL;
    EXPECT(keel_engine_models(engine, &listing, NULL) == KEEL_OK);
    EXPECT(keel_string_len(listing) == strlen(keel_string_data(listing)));
    EXPECT(strstr(keel_string_data(listing), "\"architecture\":\"llama\"") != NULL);
    keel_string_free(listing);
    keel_string_free(listing);

    /* Errors: freed, double-freed, NULL. */
    keel_error *err = NULL;
    keel_debug_panic(&err);
    keel_error_free(err);
    EXPECT(keel_error_code(err) == KEEL_ERR_INVALID_ARGUMENT);
    EXPECT(keel_error_message(err) != NULL);
    keel_error_free(err);
    EXPECT(keel_error_message(NULL) != NULL);

    /* A freed model: refused, its version unloaded, a second free ignored. */
    const char *id = keel_model_id(minilm);
    EXPECT(id != NULL && strlen(id) == 64);
    keel_model_free(minilm);
    EXPECT(keel_model_id(minilm) == NULL);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_alias(minilm, "again", &err));
    EXPECT_CODE(KEEL_ERR_NOT_FOUND, keel_embed(engine, "embed", texts, NULL, 2, NULL, &emb, &err));
    keel_model_free(minilm);

    /* A shut-down engine refuses requests. */
    bool finished = false;
    EXPECT(keel_engine_shutdown(engine, 1000, &finished, NULL) == KEEL_OK && finished);
    EXPECT_CODE(KEEL_ERR_SHUTTING_DOWN, keel_generate(engine, "chat", "Hi!", &gen, NULL, NULL, NULL, &completion, &err));

    /* A freed engine: every call refused, its models gone with it, frees ignored. */
    keel_engine_free(engine);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_embed(engine, "embed", texts, NULL, 2, NULL, &emb, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_generate(engine, "chat", "Hi!", NULL, NULL, NULL, NULL, &completion, &err));
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_load(engine, argv[1], NULL, &model, &err));
    keel_device device;
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_engine_device(engine, &device, &err));
    EXPECT(keel_model_id(smollm) == NULL);
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_model_alias(smollm, "chat", &err));
    keel_model_free(smollm);
    keel_engine_free(engine);

    /* A made-up handle. */
    EXPECT_CODE(KEEL_ERR_INVALID_ARGUMENT, keel_engine_device(JUNK(keel_engine *), &device, &err));

    EXPECT(keel_debug_live_handles() == 0);
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
