"""Misuse from Python gets a KeelError with the right code, never a crash.

    PYTHONPATH=examples/python python3 examples/python/test_misuse.py MINILM_DIR SMOLLM2_GGUF
"""

import ctypes
import sys

import keel


def expect(code, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except keel.KeelError as e:
        assert e.code == code, f"{f.__name__}: {e} (expected {keel.lib.keel_status_name(code).decode()})"
        return e
    raise AssertionError(f"{f.__name__}{args} did not fail")


def main():
    minilm_dir, gguf = sys.argv[1], sys.argv[2]
    e = expect(keel.ERR_INTERNAL, keel._call, keel.lib.keel_debug_panic)
    assert "keel_debug_panic" in e.message, e.message
    expect(keel.ERR_NO_DEVICE, keel.Engine, keel.DEVICE_CUDA)
    expect(keel.ERR_INVALID_ARGUMENT, keel.Engine, 17)

    engine = keel.Engine()
    expect(keel.ERR_NOT_FOUND, engine.load, "/no/such/model")
    minilm = engine.load(minilm_dir)
    smollm = engine.load(gguf)
    assert sorted(m["architecture"] for m in engine.models()) == ["bert", "llama"], engine.models()
    expect(keel.ERR_INVALID_ARGUMENT, engine.embed, minilm.id, [b"caf\xc3"])
    expect(keel.ERR_INVALID_ARGUMENT, engine.embed, minilm.id, [""])
    expect(keel.ERR_INVALID_ARGUMENT, engine.embed, minilm.id, [])
    expect(keel.ERR_NOT_FOUND, engine.embed, "nope", ["x"])
    expect(keel.ERR_INVALID_ARGUMENT, engine.embed, smollm.id, ["x"])
    expect(keel.ERR_INVALID_ARGUMENT, engine.generate, smollm.id, b"caf\xc3")
    expect(keel.ERR_INVALID_ARGUMENT, engine.generate, smollm.id, "Hi", temperature=-1.0)

    # A callback that raises stops the generation; the exception comes back to the caller.
    def boom(_text):
        raise ValueError("stop here")

    try:
        engine.generate(smollm.id, "Hi", max_tokens=5, chat=False, on_token=boom)
        raise AssertionError("the callback's exception was lost")
    except ValueError:
        pass
    # A callback that returns False cancels.
    done = engine.generate(smollm.id, "Hi", max_tokens=5, chat=False, on_token=lambda t: False)
    assert done.finish == "cancelled" and len(done.tokens) == 1, done

    # Request controls, the system prompt, counters, engine options.
    expect(keel.ERR_INVALID_ARGUMENT, engine.embed, minilm.id, ["x"], priority=9)
    assert len(engine.embed(minilm.id, ["x"], priority=keel.PRIORITY_HIGH, use_cache=False)) == 1
    expect(keel.ERR_INVALID_ARGUMENT, engine.generate, smollm.id, "Hi", system=b"caf\xc3")
    pirate = engine.generate(smollm.id, "Hi", max_tokens=2, system="You are a pirate.")
    assert pirate.prompt_tokens != engine.generate(smollm.id, "Hi", max_tokens=2).prompt_tokens
    assert engine.stats(minilm.id)["scheduler"]["completed"] >= 1
    expect(keel.ERR_NOT_FOUND, engine.stats, "nope")
    with keel.Engine(response_cache_bytes=0, max_streams=2) as other:
        assert other.stats()["response_cache"] is None
    try:
        keel.Engine(no_such_option=1)
        raise AssertionError("an unknown option was accepted")
    except TypeError:
        pass

    # Freed handles.
    minilm.free()
    minilm.free()
    expect(keel.ERR_INVALID_ARGUMENT, minilm.alias, "again")
    expect(keel.ERR_NOT_FOUND, engine.embed, minilm.id, ["x"])
    assert engine.shutdown(1000) is True
    expect(keel.ERR_SHUTTING_DOWN, engine.generate, smollm.id, "Hi")
    engine.close()
    engine.close()
    expect(keel.ERR_INVALID_ARGUMENT, engine.embed, smollm.id, ["x"])
    expect(keel.ERR_INVALID_ARGUMENT, smollm.alias, "chat")
    smollm.free()
    # A made-up handle.
    out = ctypes.c_uint32()
    expect(keel.ERR_INVALID_ARGUMENT, keel._call, keel.lib.keel_engine_device, ctypes.c_void_p(0x10), ctypes.byref(out))
    assert keel.live_handles() == 0, keel.live_handles()
    print("python misuse checks passed")


if __name__ == "__main__":
    main()
