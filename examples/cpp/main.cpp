// A C++ host linking libkeel: RAII ownership of the handles, a lambda as the token callback.
//
//   keel_cpp_example MINILM_DIR SMOLLM2_GGUF
//
// Built by the Makefile or CMakeLists.txt next to it, both through pkg-config (see docs/FFI.md).
#include <keel.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Each handle type owned by a unique_ptr that calls its keel_*_free.
template <typename T, void (*Free)(T *)>
struct Deleter {
    void operator()(T *p) const { Free(p); }
};
using Engine = std::unique_ptr<keel_engine, Deleter<keel_engine, keel_engine_free>>;
using Model = std::unique_ptr<keel_model, Deleter<keel_model, keel_model_free>>;
using Embeddings = std::unique_ptr<keel_embeddings, Deleter<keel_embeddings, keel_embeddings_free>>;

// Turns a failed call into an exception carrying the library's message.
void check(keel_status status, keel_error *err) {
    if (status == KEEL_OK) return;
    std::string message = std::string(keel_status_name(status)) + ": " + keel_error_message(err);
    keel_error_free(err);
    throw std::runtime_error(message);
}

}  // namespace

int main(int argc, char **argv) try {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s MINILM_DIR SMOLLM2_GGUF\n", argv[0]);
        return 2;
    }
    if (keel_abi_version() != KEEL_ABI_VERSION) throw std::runtime_error("libkeel ABI mismatch");
    keel_error *err = nullptr;

    keel_engine *e = nullptr;
    check(keel_engine_new(nullptr, &e, &err), err);
    Engine engine(e);

    keel_model *m = nullptr;
    check(keel_model_load(engine.get(), argv[1], nullptr, &m, &err), err);
    Model minilm(m);
    const char *texts[] = {"A C++ program embeds text.", "C++ code computes sentence vectors."};
    keel_embeddings *out = nullptr;
    check(keel_embed(engine.get(), keel_model_id(minilm.get()), texts, nullptr, 2, nullptr, &out, &err), err);
    Embeddings emb(out);
    const std::size_t dim = keel_embeddings_dim(emb.get());
    const float *a = keel_embeddings_vector(emb.get(), 0), *b = keel_embeddings_vector(emb.get(), 1);
    double cosine = 0;
    for (std::size_t k = 0; k < dim; k++) cosine += double(a[k]) * b[k];
    std::printf("cosine similarity of the two sentences: %.3f\n", cosine);

    check(keel_model_load(engine.get(), argv[2], nullptr, &m, &err), err);
    Model smollm(m);
    keel_generate_params params = keel_generate_default_params();
    params.max_tokens = 16;
    std::string reply;
    auto on_token = [](void *user_data, uint32_t, const char *text, size_t len) -> bool {
        static_cast<std::string *>(user_data)->append(text, len);
        return true;
    };
    check(keel_generate(engine.get(), keel_model_id(smollm.get()), "Say hello in French.", &params, nullptr, on_token,
                        &reply, nullptr, &err),
          err);
    std::printf("reply: %s\n", reply.c_str());
    if (reply.empty() || !(std::fabs(cosine) <= 1.0001)) return 1;
    return 0;
} catch (const std::exception &e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
}
