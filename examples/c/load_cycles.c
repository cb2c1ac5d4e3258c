/*
 * Loads and frees one model many times on one engine and watches the resident set size: a leak
 * in loading, unloading or the handles would make it grow with the cycles.
 *
 *   load_cycles MODEL CYCLES MAX_GROWTH_KIB
 *
 * Each cycle loads MODEL, runs it once (embeds a sentence, or generates one token), and frees it.
 * RSS is read from /proc/self/statm (Linux) after a warm-up of a tenth of the cycles (at least
 * 10), when the allocator has reached its working size, and at the end. Exits 1 if it grew by
 * more than MAX_GROWTH_KIB between the two, or if a handle is left live.
 */
#include <keel.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long rss_kib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    if (f) fclose(f);
    return resident < 0 ? -1 : resident * (sysconf(_SC_PAGESIZE) / 1024);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL CYCLES MAX_GROWTH_KIB\n", argv[0]);
        return 2;
    }
    int cycles = atoi(argv[2]);
    long max_growth = atol(argv[3]);
    int warmup = cycles / 10 < 10 ? 10 : cycles / 10;
    if (warmup > cycles) warmup = cycles;
    keel_error *err = NULL;
    keel_engine *engine = NULL;
    if (keel_engine_new(NULL, &engine, &err) != KEEL_OK) {
        fprintf(stderr, "keel_engine_new: %s\n", keel_error_message(err));
        return 1;
    }
    long start = rss_kib(), warm = 0, peak = 0;
    const char *text[] = {"A sentence to embed."};
    keel_generate_params gen = keel_generate_default_params();
    gen.max_tokens = 1;
    gen.chat = false;
    for (int i = 1; i <= cycles; i++) {
        keel_model *model = NULL;
        if (keel_model_load(engine, argv[1], NULL, &model, &err) != KEEL_OK) {
            fprintf(stderr, "cycle %d: keel_model_load: %s\n", i, keel_error_message(err));
            return 1;
        }
        keel_status status;
        if (strcmp(keel_model_architecture(model), "bert") == 0) {
            keel_embeddings *emb = NULL;
            status = keel_embed(engine, keel_model_id(model), text, NULL, 1, NULL, &emb, &err);
            keel_embeddings_free(emb);
        } else {
            status = keel_generate(engine, keel_model_id(model), "Hello", &gen, NULL, NULL, NULL, NULL, &err);
        }
        if (status != KEEL_OK) {
            fprintf(stderr, "cycle %d: %s\n", i, keel_error_message(err));
            return 1;
        }
        keel_model_free(model);
        long rss = rss_kib();
        if (rss > peak) peak = rss;
        if (i == warmup) warm = rss;
    }
    long end = rss_kib();
    keel_engine_free(engine);
    size_t live = keel_debug_live_handles();
    long growth = end - warm;
    printf("%d load/free cycles of %s: RSS %ld KiB at start, %ld after %d warm-up cycles, %ld at the end "
           "(peak %ld): %+ld KiB over the last %d cycles (bound %ld KiB); %zu live handles\n",
           cycles, argv[1], start, warm, warmup, end, peak, growth, cycles - warmup, max_growth, live);
    return growth > max_growth || live != 0 ? 1 : 0;
}
