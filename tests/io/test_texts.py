"""The one reader of text lists (alibi_surgery.io.texts) and the corpus framing it feeds: .txt lines, .jsonl and
.json give whole multi-line texts; bad files are refused in one line naming FILE:LINE; documents are joined with or
without EOS; --max-tokens keeps the first N tokens and stops reading."""

from __future__ import annotations

import json

import pytest

from alibi_surgery.diagnosis.prompts import read_prompts
from alibi_surgery.errors import UsageError
from alibi_surgery.io.corpus import CorpusSpec, load_corpus, pack_text
from alibi_surgery.io.random_model import byte_tokenizer
from alibi_surgery.io.texts import read_texts

MULTI = ["def f(x):\n    return x\n", "first paragraph\n\nsecond paragraph", "one line"]


def test_jsonl_and_json_keep_multi_line_texts_whole(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n\n" for i, t in enumerate(MULTI)))
    (tmp_path / "b.json").write_text(json.dumps(MULTI, indent=2))
    (tmp_path / "c.json").write_text(json.dumps([{"body": t} for t in MULTI]))
    assert read_texts(tmp_path / "a.jsonl") == MULTI
    assert read_texts(tmp_path / "b.json") == MULTI
    assert read_texts(tmp_path / "c.json", field="body") == MULTI
    assert read_prompts(["given"], tmp_path / "a.jsonl") == ["given", *MULTI]
    # where each text came from: the JSON line, or the line its item starts on
    assert read_texts(tmp_path / "a.jsonl").origins == [f"{tmp_path / 'a.jsonl'}:{n}" for n in (1, 3, 5)]
    assert [o.rsplit(":", 1)[1] for o in read_texts(tmp_path / "b.json").origins] == ["2", "3", "4"]


def test_plain_files_are_one_text_per_line_or_one_document(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\r\n\nsecond\n")
    assert read_texts(path, blank_lines="skip") == ["first", "second"]
    with pytest.raises(UsageError, match=r"p.txt: line 2 is blank .*give texts with blank lines as .jsonl or .json"):
        read_texts(path)
    assert read_texts(path, plain="whole") == ["first\r\n\nsecond\n"]


@pytest.mark.parametrize("name,content,field,needle", [
    ("t.jsonl", '{"text": "a"}\n{"text": "b"\n', "text", r"t.jsonl:2: not a JSON line"),
    ("t.jsonl", '{"text": "a"}\n{"body": "b"}\n', "text", r't.jsonl:2: the object has no "text" field \(fields: body\)'),
    ("t.jsonl", '{"text": 3}\n', "text", r't.jsonl:1: "text" is not a string \(int\)'),
    ("t.jsonl", '"just a string"\n', "text", r"t.jsonl:1: str where an object"),
    ("t.jsonl", '{"text": "a"}\n\n{"text": "  \\n "}\n', "text", r"t.jsonl:3: the text is empty"),
    ("t.json", '[\n  "a",\n  "b"\n  "c"\n]', "text", r"t.json:4: not valid JSON|t.json:4: expected ',' or ']'"),
    ("t.json", '[\n  "a",\n  {"x": "b"}\n]', "text", r't.json:3: the object has no "text" field'),
    ("t.json", '[\n  "a",\n  ""\n]', "text", r"t.json:3: the text is empty"),
    ("t.json", '{"text": "a"}', "text", r"t.json:1: a .json file of texts must hold one list"),
    ("t.json", '["a"]\n["b"]', "text", r"t.json:2: extra data after the list"),
    ("t.json", "[]", "text", r"prompts file is empty"),
    ("t.json", "  \n", "text", r"prompts file is empty"),
    ("t.jsonl", "\n\n", "text", r"prompts file is empty"),
])
def test_bad_text_files_are_refused_naming_the_line(tmp_path, name, content, field, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UsageError, match=needle) as err:
        read_texts(path, field=field)
    assert "\n" not in str(err.value)


def test_pack_text_with_and_without_eos_against_hand_built_rows():
    tok = byte_tokenizer(add_bos=True)
    docs = ["abc", "defg", "hi"]
    body = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    with_eos = [t for b in body for t in [tok.bos_token_id, *b, tok.eos_token_id]]
    without = [t for b in body for t in [tok.bos_token_id, *b]]
    assert pack_text(docs, tok, 4).flatten().tolist() == with_eos[:len(with_eos) // 4 * 4]
    assert pack_text(docs, tok, 3, eos=False).flatten().tolist() == without[:len(without) // 3 * 3]
    assert tok.eos_token_id not in pack_text(docs, tok, 3, eos=False).flatten().tolist()
    # the first N tokens of the same stream, then rows
    assert pack_text(docs, tok, 2, max_tokens=7).flatten().tolist() == with_eos[:6]
    assert pack_text(docs, tok, 7, max_tokens=7).flatten().tolist() == with_eos[:7]
    with pytest.raises(UsageError, match=r"too short: 5 tokens \(max_tokens=5\), fewer than one chunk of seq_len=6"):
        pack_text(docs, tok, 6, max_tokens=5)


def test_max_tokens_stops_reading_once_the_cap_is_packed(tmp_path):
    """The second file is not UTF-8: read in full the corpus is refused, capped inside the first file it is never
    read, and the rows are the first N tokens of the first file's documents."""
    tok = byte_tokenizer(add_bos=False)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": "x" * 9}) + "\n" for _ in range(4)))
    (tmp_path / "b.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8 text"):
        load_corpus([str(tmp_path)], tok, 5)
    rows, sources = load_corpus(CorpusSpec((str(tmp_path),), max_tokens=25), tok, 5)
    expected = ([tok("x")["input_ids"][0]] * 9 + [tok.eos_token_id]) * 3
    assert rows.flatten().tolist() == expected[:25] and sources == [tmp_path / "a.jsonl"]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UsageError, match=rf"max_tokens={bad}: must be a whole number of tokens >= 1"):
            CorpusSpec(("x",), max_tokens=bad)


def test_corpus_documents_from_json_and_txt_files(tmp_path):
    tok = byte_tokenizer(add_bos=True)
    (tmp_path / "d.json").write_text(json.dumps([{"body": "ab\ncd"}, {"body": "ef"}]))
    (tmp_path / "e.txt").write_text("gh\n\nij")
    rows, _ = load_corpus(CorpusSpec((str(tmp_path),), text_field="body", eos=False), tok, 1 + 2 + 1 + 2)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    b = tok.bos_token_id
    expected = [b, *ids("ab\ncd"), b, *ids("ef"), b, *ids("gh\n\nij")]
    assert rows.flatten().tolist() == expected[:len(expected) // 6 * 6]
