/*
 * Embed and generate with libkeel from C.
 *
 *   embed_generate MINILM_DIR SMOLLM2_GGUF [DUMP_FILE]
 *
 * Loads an encoder (all-MiniLM-L6-v2) and a decoder (SmolLM2-135M-Instruct), embeds three
 * sentences, and streams a greedy reply to a question. With DUMP_FILE it also writes the exact
 * results (the bits of every float, every token id, the text's bytes) in the format of
 * `cargo run --release -p keel-ffi --example reference`, so that scripts/test-ffi.sh can check
 * that C gets what the Rust API gets, bit for bit.
 *
 * Build (see docs/FFI.md):
 *   cc -std=c11 -Iinclude examples/c/embed_generate.c -Ltarget/release -lkeel \
 *      -Wl,-rpath,$PWD/target/release -o embed_generate
 */
#include <keel.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The inputs: the same in examples/python/embed_generate.py and ffi/examples/reference.rs. */
static const char *const TEXTS[] = {
    "The quick brown fox jumps over the lazy dog.",
    "Keel runs models inside the host process.",
    "Ünïcödé text, too: 日本語.", /* UTF-8 source */
};
#define N_TEXTS (sizeof TEXTS / sizeof TEXTS[0])
/* A question the 135M model answers right on its quantized weights (to "What is the capital of
 * France?" its Q4_1 greedy reply is "L'Etoile, ...", while f32 says Paris). */
static const char *const PROMPT = "What is 2+2?";
#define MAX_TOKENS 32

/* Prints the error of a failed call, frees it, and exits. */
static void die(const char *what, keel_status status, keel_error *err) {
    fprintf(stderr, "%s failed: %s: %s\n", what, keel_status_name(status), keel_error_message(err));
    keel_error_free(err);
    exit(1);
}

/* Streams tokens to stdout as they come. */
static bool print_token(void *user_data, uint32_t token_id, const char *text, size_t text_len) {
    size_t *count = user_data;
    (void)token_id;
    fwrite(text, 1, text_len, stdout);
    fflush(stdout);
    ++*count;
    return true; /* false would stop the generation */
}

static const char *finish_name(keel_finish_reason reason) {
    switch (reason) {
    case KEEL_FINISH_STOP: return "stop";
    case KEEL_FINISH_LENGTH: return "length";
    case KEEL_FINISH_CONTEXT_FULL: return "context_full";
    case KEEL_FINISH_CANCELLED: return "cancelled";
    }
    return "unknown";
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MINILM_DIR SMOLLM2_GGUF [DUMP_FILE]\n", argv[0]);
        return 2;
    }
    if (keel_abi_version() != KEEL_ABI_VERSION) {
        fprintf(stderr, "keel.h is ABI %d but the libkeel loaded is ABI %u: rebuild against its header\n",
                KEEL_ABI_VERSION, keel_abi_version());
        return 1;
    }
    FILE *dump = NULL;
    if (argc > 3 && !(dump = fopen(argv[3], "w"))) {
        perror(argv[3]);
        return 1;
    }

    keel_error *err = NULL;
    keel_engine_params params = keel_engine_default_params();
    params.device = KEEL_DEVICE_CPU;
    keel_engine *engine = NULL;
    keel_status status = keel_engine_new(&params, &engine, &err);
    if (status != KEEL_OK) die("keel_engine_new", status, err);

    /* Embeddings: load the encoder, name it, embed a batch. */
    keel_model *minilm = NULL;
    status = keel_model_load(engine, argv[1], NULL, &minilm, &err);
    if (status != KEEL_OK) die("keel_model_load(minilm)", status, err);
    status = keel_model_alias(minilm, "embed", &err);
    if (status != KEEL_OK) die("keel_model_alias", status, err);
    printf("loaded %s (%s), version %.12s\n", keel_model_name(minilm), keel_model_architecture(minilm),
           keel_model_id(minilm));

    keel_embeddings *emb = NULL;
    status = keel_embed(engine, "embed", TEXTS, NULL, N_TEXTS, NULL, &emb, &err);
    if (status != KEEL_OK) die("keel_embed", status, err);
    size_t count = keel_embeddings_count(emb), dim = keel_embeddings_dim(emb);
    printf("%zu embeddings of dimension %zu; cosine similarities:\n", count, dim);
    for (size_t i = 0; i < count; i++) {
        for (size_t j = 0; j < count; j++) {
            const float *a = keel_embeddings_vector(emb, i), *b = keel_embeddings_vector(emb, j);
            double dot = 0;
            for (size_t k = 0; k < dim; k++) dot += (double)a[k] * b[k];
            printf(" %6.3f", dot);
        }
        printf("\n");
    }
    if (dump) {
        for (size_t i = 0; i < count; i++) {
            const float *v = keel_embeddings_vector(emb, i);
            fprintf(dump, "embedding %zu %zu", i, dim);
            for (size_t k = 0; k < dim; k++) {
                uint32_t bits;
                memcpy(&bits, &v[k], sizeof bits);
                fprintf(dump, " %08x", bits);
            }
            fprintf(dump, "\n");
        }
    }
    keel_embeddings_free(emb);

    /* Generation: load the decoder, stream a greedy reply, keep the completion too. */
    keel_model *smollm = NULL;
    status = keel_model_load(engine, argv[2], NULL, &smollm, &err);
    if (status != KEEL_OK) die("keel_model_load(smollm2)", status, err);
    keel_generate_params gen = keel_generate_default_params();
    gen.max_tokens = MAX_TOKENS;
    printf("\n> %s\n", PROMPT);
    size_t streamed = 0;
    keel_completion *completion = NULL;
    status = keel_generate(engine, keel_model_id(smollm), PROMPT, &gen, NULL, print_token, &streamed, &completion, &err);
    if (status != KEEL_OK) die("keel_generate", status, err);
    size_t n = keel_completion_token_count(completion);
    printf("\n(%zu tokens, finish: %s)\n", n, finish_name(keel_completion_finish_reason(completion)));
    if (streamed != n) {
        fprintf(stderr, "streamed %zu tokens but the completion has %zu\n", streamed, n);
        return 1;
    }
    if (dump) {
        const uint32_t *ids = keel_completion_tokens(completion);
        const unsigned char *text = (const unsigned char *)keel_completion_text(completion);
        fprintf(dump, "completion %zu %s\ntokens", n, finish_name(keel_completion_finish_reason(completion)));
        for (size_t i = 0; i < n; i++) fprintf(dump, " %u", ids[i]);
        fprintf(dump, "\ntext ");
        for (size_t i = 0; i < keel_completion_text_len(completion); i++) fprintf(dump, "%02x", text[i]);
        fprintf(dump, "\n");
        fclose(dump);
    }
    keel_completion_free(completion);

    keel_model_free(smollm);
    keel_model_free(minilm);
    keel_engine_free(engine);
    return 0;
}
