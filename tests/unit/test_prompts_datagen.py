"""SynCD prompt generation (datagen/prompts.py): clean-up of messy LLM output against upstream's rule, the
combination into per-image prompts, the offline template mode, the OpenAI-compatible backend against a local HTTP
server (body, retries, errors), a tiny random-weight causal LM end to end, and resume."""

from __future__ import annotations

import http.server
import json
import re
import threading

import pytest

from comfyui_syncd.datagen import prompts as P

pytestmark = pytest.mark.unit

MESSY = """Here are 25 captions for images of a Cat:

1. A Cat sitting in a garden.
2. "A cat is sitting beside a book in a library."
- a cat next to a red ball on a lawn
3.  A CAT sitting in a garden.
**Background and Scene Captions**
Note: these captions are factual.
4. A dog in a park.
5. A cat with 3 kittens on a sofa.
6. ...A cat on a roof.
* The cat's toy on a shelf
7) A caterpillar on a leaf.
8. Cats on a wall.
I hope these suggestions meet your requirements!"""


def upstream_clean(text):
    """gen_prompts.py clean_prompt, re-derived from the reference: every digit removed, leading dots removed,
    lowercase, strip, '"' removed, marker lines dropped, set()."""
    lines = [re.sub(r"[0-9]+", "", x) for x in text.split("\n")]
    lines = [re.sub(r"^\.+", "", x) for x in lines]
    lines = [x.lower().strip().replace('"', "") for x in lines]
    markers = ("suggestions", "note:", "captions", "**", "brief description", "detailed visual",
               "additional captions", "meet your requirements!")
    return set(x for x in lines if x != "" and not any(m in x for m in markers))


def test_clean_captions_on_messy_llm_output():
    got = P.clean_captions(MESSY, "Cat")
    assert got == ["a cat sitting in a garden.",                # "Cat"/"CAT" lowercased, duplicate dropped
                   "a cat is sitting beside a book in a library.",  # quotes removed
                   "a cat next to a red ball on a lawn",        # bullet
                   "a cat with  kittens on a sofa.",            # upstream: every digit goes
                   "a cat on a roof.",                          # numbering, then leading dots
                   "the cat's toy on a shelf"]                  # "cat's" counts; caterpillar, cats, dog do not
    kept = P.clean_captions(MESSY, "cat", strip_digits="numbering")
    assert "a cat with 3 kittens on a sofa." in kept and len(kept) == len(got)
    # no category requirement: everything but meta lines survives, bullets and "7)" stripped
    loose = P.clean_captions(MESSY)
    assert "a dog in a park." in loose and "a caterpillar on a leaf." in loose and "cats on a wall." in loose
    assert not any("here are" in x or "captions" in x or "suggestions" in x for x in loose)
    # several samples (one answer each): duplicates across them go too, first-seen order
    assert P.clean_captions(["2. A cat.\n1. Cat on a mat", "cat on a mat\n- a cat."], "cat") == [
        "a cat.", "cat on a mat"]
    with pytest.raises(ValueError, match="strip_digits"):
        P.clean_captions("x", strip_digits="some")


def test_clean_captions_matches_upstream_rule_where_it_applies():
    """Lines without bullets or a category requirement: the same captions as upstream's clean_prompt. (Not
    "6. ...a cat": upstream's space after the removed number keeps the dots, ours go.)"""
    text = "\n".join(line for line in MESSY.splitlines() if not line.lstrip().startswith(("-", "*", "7)", "6."))
                     and not line.startswith("Here"))
    assert set(P.clean_captions(text)) == upstream_clean(text)
    assert P.clean_captions("ok, here are more\nsure! ten captions\nbackgrounds:\n9. a cat.") == ["a cat."]


def test_style_phrases_upstream_and_word_modes():
    assert len(P.STYLE_PHRASES) == 55
    text = "a vintage red car in a modernist cafe with a futuristic sign"
    # upstream: str.replace of " vintage", " modern" (also inside "modernist"), " futuristic"
    assert P.strip_style_phrases(text) == "a red car in aist cafe with a sign"
    assert P.strip_style_phrases(text, "word") == "a red car in a modernist cafe with a sign"
    assert P.strip_style_phrases(text, "off") == text
    assert P.strip_style_phrases("a retro-style lamp", "word") == "a lamp"


def test_combination_and_grouping_as_upstream():
    assert P.deformable_prompt("a cat in a garden.", "the siamese cat has blue eyes") == \
        "a cat in a garden.. the siamese cat has blue eyes. wide angle shot"   # f'{bg}. {desc}. wide angle shot'
    assert P.rigid_prompt("a red mug on a desk.") == "a red mug on a desk. a natural image with the object on the ground."
    bgs = [f"b{i}" for i in range(7)]
    # range(0, len - 3, 3): 6 captions give one triplet, 7 give two
    assert P.background_groups(bgs[:6], 3) == [("b0", "b1", "b2")]
    assert P.background_groups(bgs[:6], 3, all_groups=True) == [("b0", "b1", "b2"), ("b3", "b4", "b5")]
    assert P.background_groups(bgs, 3) == [("b0", "b1", "b2"), ("b3", "b4", "b5")]
    assert P.background_groups(bgs[:3], 3) == [] and P.background_groups(bgs[:3], 3, all_groups=True) == [tuple(bgs[:3])]
    assert list(P.object_pairs(2, 3)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    diagonal = list(P.object_pairs(2, 3, "diagonal"))
    assert sorted(diagonal) == list(P.object_pairs(2, 3)) and diagonal[:2] == [(0, 0), (1, 1)]
    # rigid repeats: [min(L-K, K*r):][i % len], none when L < K*(r+1)
    assert P.rigid_backgrounds_for_repeat(bgs, 3, 0) == ["b0", "b1", "b2"]
    assert P.rigid_backgrounds_for_repeat(bgs, 3, 1) == ["b3", "b4", "b5"]
    assert P.rigid_backgrounds_for_repeat(bgs[:4], 3, 1) is None
    assert P.rigid_backgrounds_for_repeat(bgs[:3], 3, 0) == ["b0", "b1", "b2"]
    record = {"kind": "deformable", "description": "the cat is gray",
              "prompts": [P.deformable_prompt("a cat on a mat.", "the cat is gray")]}
    assert P.dataset_captions(record) == ["a cat on a mat."]
    assert P.dataset_captions({"kind": "rigid", "prompts": [P.rigid_prompt("a mug")]}) == ["a mug"]


def test_instructions_follow_the_documented_structure():
    msgs = P.CaptionRequest(P.TASK_BACKGROUND, "cat", 25, 6).messages()
    assert [m["role"] for m in msgs] == ["system", "user"] and "caption" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert "25 captions" in user and 'the word "cat"' in user and "background" in user
    assert user.count("\n1. ") == 2 and "3. " in user    # three guidance points, three few-shot examples
    desc = P.CaptionRequest(P.TASK_DESCRIPTION, "dog", 25, 6).messages()[1]["content"]
    assert "color and subspecies" in desc and 'the word "dog"' in desc
    rigid = P.CaptionRequest(P.TASK_ASSET_BACKGROUND, "a blue drum", 10).messages()[1]["content"]
    assert "10 captions for images of a blue drum" in rigid and rigid.count("Example captions for") == 2


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_template_mode_deterministic_and_schema_valid(tmp_path):
    args = ["--categories", "animals", "Teddy Bear", "mug", "--objects-per-category", "5", "--no-progress"]
    assert P.main(["--out", str(tmp_path / "a.jsonl"), "--seed", "3", *args]) == 0
    assert P.main(["--out", str(tmp_path / "b.jsonl"), "--seed", "3", *args]) == 0
    assert P.main(["--out", str(tmp_path / "c.jsonl"), "--seed", "4", *args]) == 0
    a, b, c = (read_jsonl(tmp_path / f"{n}.jsonl") for n in "abc")
    assert a == b and a != c
    assert len(a) == 18 * 5 and len({r["object_id"] for r in a}) == len(a)
    assert {r["category"] for r in a} == set(P.UPSTREAM_ANIMALS) | {"teddy bear", "mug"}
    for r in a:
        P.validate_record(r)
        assert list(r)[:5] == ["object_id", "category", "kind", "description", "prompts"]
        assert re.fullmatch(r"[a-z0-9._-]+", r["object_id"]) and r["kind"] == "deformable"
        assert len(r["prompts"]) == 3 and len(set(r["prompts"])) == 3
        for p in r["prompts"]:
            assert p == p.lower() and P.contains_word(p, r["category"]) and p.endswith(". wide angle shot")
            assert f". {r['description']}. " in p
    teddy = [r for r in a if r["category"] == "teddy bear"]
    assert [r["object_id"] for r in teddy] == [f"teddy-bear-000{i}" for i in range(1, 6)]
    assert any("an alpaca" in p for r in a if r["category"] == "alpaca" for p in r["prompts"])
    assert not any(" a alpaca" in p for r in a for p in r["prompts"])


def test_template_mode_rigid_captions(tmp_path):
    (tmp_path / "cap3d.csv").write_text('abc123,"a large metal drum with blue and pink stripes, on a stand"\n'
                                        "f00d,a vintage wooden chair\n")
    (tmp_path / "assets.jsonl").write_text(json.dumps({"asset_id": "x1", "caption": "a red Mug with a handle",
                                                       "category": "Mug", "mesh": "meshes/x1.glb"}) + "\n")
    assert P.main(["--out", str(tmp_path / "r.jsonl"), "--rigid-captions", str(tmp_path / "cap3d.csv"),
                   "--no-progress"]) == 0
    assert P.main(["--out", str(tmp_path / "r.jsonl"), "--rigid-captions", str(tmp_path / "assets.jsonl"),
                   "--no-progress"]) == 0
    records = read_jsonl(tmp_path / "r.jsonl")
    assert [r["object_id"] for r in records] == ["abc123-0", "abc123-1", "f00d-0", "f00d-1", "x1-0", "x1-1"]
    for r in records:
        P.validate_record(r)
        assert r["kind"] == "rigid" and r["negative_prompt"] == P.RIGID_NEGATIVE_PROMPT
        assert all(p.endswith(" a natural image with the object on the ground.") for p in r["prompts"])
    drum = records[0]
    assert drum["category"] == "object" and drum["asset_id"] == "abc123" and "mesh" not in drum
    assert all(p.startswith("a large metal drum with blue and pink stripes, on a stand ") for p in drum["prompts"])
    assert set(records[0]["prompts"]).isdisjoint(records[1]["prompts"])   # repeat 1 takes the next captions
    chair = records[2]["prompts"][0]
    assert chair.startswith("a wooden chair ") and "vintage" not in chair   # style word stripped (upstream)
    mug = records[4]
    assert mug["category"] == "mug" and mug["mesh"] == str((tmp_path / "meshes" / "x1.glb").resolve())
    assert all(P.contains_word(p, "mug") for p in mug["prompts"])


# ------------------------------------------------------------------------------------------- OpenAI backend
class ChatServer:
    """A local OpenAI-compatible server: answers from a script of (status, body) per request, records them."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                status, answer = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                if callable(answer):
                    answer = answer(body)
                data = (json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
                        if status == 200 else json.dumps({"error": answer})).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server():
    servers = []

    def make(*script):
        servers.append(ChatServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def canned(body):
    """Background or description captions for the category the request is about, LLM-style messy."""
    user = body["messages"][1]["content"]
    tag = "".join(chr(97 + int(d)) for d in str(body["seed"]))   # letters: upstream's clean-up drops digits
    if "background" in user and "nothing about the background" not in user:
        return "Here are the captions:\n" + "\n".join(f"{i}. A Cat in scene {tag}{'x' * i}." for i in range(1, 8))
    return "\n".join(f"{i}. The Cat number {tag}{'y' * i} has gray fur." for i in range(1, 4))


def test_openai_backend_request_body_and_pipeline(chat_server, tmp_path):
    server = chat_server((200, canned))
    backend = P.OpenAIChat(server.url, "llama3", api_key="sk-test", retries=0)
    options = P.Options(objects_per_category=4, samples_per_request=2, captions_per_request=7)
    assert P.generate(tmp_path / "p.jsonl", backend, options, ["Cat"], progress=False) == 4
    assert len(server.requests) == 4          # (description, background) x 2 samples
    for req in server.requests:
        body = req["body"]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
        assert body["model"] == "llama3" and body["temperature"] == 0.6 and body["top_p"] == 0.9
        assert body["max_tokens"] == 2048
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert '"cat"' in body["messages"][1]["content"] and "Cat" not in body["messages"][1]["content"]
    assert len({r["body"]["seed"] for r in server.requests}) == 4
    records = read_jsonl(tmp_path / "p.jsonl")
    for r in records:
        P.validate_record(r)
        assert r["category"] == "cat" and r["description"].startswith("the cat number ")
        assert all(p.startswith("a cat in scene ") for p in r["prompts"])
    # the captions were cached next to the prompts file
    assert json.loads((tmp_path / "p.jsonl.captions.json").read_text())


def test_openai_backend_retries_then_clear_errors(chat_server):
    request = P.CaptionRequest(P.TASK_BACKGROUND, "cat", 3, 1, 0)
    flaky = chat_server((500, "overloaded"), (200, "1. a cat on a mat"))
    assert P.OpenAIChat(flaky.url + "/v1", "m", backoff=0).complete(request, P.Sampling()) == ["1. a cat on a mat"]
    assert len(flaky.requests) == 2 and flaky.requests[1]["path"] == "/v1/chat/completions"

    down = chat_server((500, "boom"))
    with pytest.raises(P.PromptGenerationError, match=r"failed 3 times \(last: HTTP 500.*boom"):
        P.OpenAIChat(down.url, "m", retries=2, backoff=0).complete(request, P.Sampling())
    assert len(down.requests) == 3

    refused = chat_server((404, "model 'm' not found"))
    with pytest.raises(P.PromptGenerationError, match="refused the request.*404.*not found.*--model"):
        P.OpenAIChat(refused.url, "m", retries=5, backoff=0).complete(request, P.Sampling())
    assert len(refused.requests) == 1       # not retried

    port = down.server.server_address[1]
    down.close()
    with pytest.raises(P.PromptGenerationError, match="failed 2 times.*is the server running"):
        P.OpenAIChat(f"http://127.0.0.1:{port}", "m", retries=1, backoff=0, timeout=5).complete(
            request, P.Sampling())
    with pytest.raises(P.PromptGenerationError, match="--url"):
        P.OpenAIChat("localhost:8080", "m")


# ------------------------------------------------------------------------------------ tiny transformers LM
WORDS = ["<unk>", "<eos>", "<pad>", "<|eot_id|>", "\n", "cat", "Cat", "1.", "2.", "-", "a", "on", "the", "mat",
         "sofa", "garden", "Here", "are", "captions:", "with", "red", "ball", "sits", "in", "."]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A 1-layer Llama with random weights and a word-level tokenizer built offline (newline is a token, so the
    output has lines), with a chat template; EOS is held off by min_new_tokens so every sample has text."""
    torch = pytest.importorskip("torch")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llm")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
                                                 pre_tokenizers.Split(Regex(r" +"), behavior="removed")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant\n{% endif %}")
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=2, min_new_tokens=40)
    model.save_pretrained(path)
    return path


@pytest.fixture
def single_thread():
    """Tiny matmuls: one torch thread (two threads on a busy 2-core machine wait on each other ~30x longer)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_transformers_backend_tiny_random_model_end_to_end(tiny_chat_model, tmp_path, single_thread):
    backend = P.TransformersChat(tiny_chat_model, device="cpu")
    assert backend.stop_ids == [1, 3]                 # eos and <|eot_id|>
    request = P.CaptionRequest(P.TASK_BACKGROUND, "cat", 5, 3, seed=7)
    sampling = P.Sampling(max_new_tokens=40)
    answers = backend.complete(request, sampling)
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    assert not any("system" in a or "Write" in a for a in answers)   # only the new tokens, not the prompt
    assert backend.complete(request, sampling) == answers            # seeded
    options = P.Options(objects_per_category=3, samples_per_request=6, captions_per_request=5, seed=1,
                        sampling=P.Sampling(max_new_tokens=40))
    written = P.generate(tmp_path / "p.jsonl", backend, options, ["cat"], progress=False, warn=lambda m: None)
    records = read_jsonl(tmp_path / "p.jsonl")
    assert written == len(records) == 3          # garbage text, yet enough lines hold "cat"
    for r in records:
        P.validate_record(r)
        assert r["description"] == r["description"].lower()
        assert not any("here are" in p or "captions" in p or re.search(r"\d", p) for p in r["prompts"])


def test_transformers_backend_clear_errors(tmp_path):
    with pytest.raises(P.PromptGenerationError, match="no such folder"):
        P.TransformersChat(str(tmp_path / "missing"))
    with pytest.raises(P.PromptGenerationError, match="could not be loaded"):
        P.TransformersChat(tmp_path)


# -------------------------------------------------------------------------------------------------- resume
def test_resume_appends_without_duplicates(tmp_path, chat_server):
    out = tmp_path / "p.jsonl"
    base = ["--out", str(out), "--categories", "cat", "mug", "--no-progress", "--seed", "5"]
    assert P.main(base + ["--objects-per-category", "2"]) == 0
    first = out.read_text()
    assert P.main(base + ["--objects-per-category", "4"]) == 0
    records = read_jsonl(out)
    assert out.read_text().startswith(first)
    assert sorted(r["object_id"] for r in records) == sorted(f"{c}-000{i}" for c in ("cat", "mug") for i in range(1, 5))
    fresh = tmp_path / "fresh.jsonl"
    assert P.main(["--out", str(fresh)] + base[2:] + ["--objects-per-category", "4"]) == 0
    assert sorted(map(json.dumps, read_jsonl(fresh))) == sorted(map(json.dumps, records))  # same as one run
    # an interrupted run's cut-off last line is dropped and the object written again
    out.write_text(out.read_text()[:-40])
    assert P.main(base + ["--objects-per-category", "4"]) == 0
    assert sorted(map(json.dumps, read_jsonl(out))) == sorted(map(json.dumps, records))

    # LLM backend: a finished category is not asked again; a partly written one reuses the cached captions
    server = chat_server((200, canned))
    llm = ["--out", str(tmp_path / "llm.jsonl"), "--backend", "openai", "--url", server.url, "--model", "m",
           "--categories", "cat", "--samples-per-request", "1", "--no-progress"]
    assert P.main(llm + ["--objects-per-category", "2"]) == 0
    asked = len(server.requests)
    assert asked == 2
    assert P.main(llm + ["--objects-per-category", "2"]) == 0 and len(server.requests) == asked
    assert P.main(llm + ["--objects-per-category", "3"]) == 0 and len(server.requests) == asked
    ids = [r["object_id"] for r in read_jsonl(tmp_path / "llm.jsonl")]
    assert ids == ["cat-0001", "cat-0002", "cat-0003"]


def test_cli_errors_say_what_to_fix(tmp_path, capsys):
    out = ["--out", str(tmp_path / "p.jsonl"), "--no-progress"]
    assert P.main(out + ["--backend", "transformers"]) == 2
    assert "needs --model PATH" in capsys.readouterr().err
    assert P.main(out + ["--backend", "openai", "--model", "m"]) == 2
    assert "needs --url" in capsys.readouterr().err
    assert P.main(out + ["--categories", "unicorn"]) == 2
    assert "no descriptions for unicorn" in capsys.readouterr().err
    assert P.main(out + ["--rigid-captions", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text("not json\n")
    assert P.main(out + ["--categories", "cat"]) == 2
    assert "p.jsonl:1: not a prompts-file line" in capsys.readouterr().err
