import pytest

from gemma2_tune.data.turns import BadRow, Turn, normalise, render, supervision_mask


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_golden_gemma_format():
    turns = normalise(msgs(("user", "knock knock"), ("assistant", "who is there"), ("user", "LaMDA"),
                           ("model", "LaMDA who?")), "fold")
    assert render(turns).text == (
        "<bos><start_of_turn>user\nknock knock<end_of_turn>\n"
        "<start_of_turn>model\nwho is there<end_of_turn>\n"
        "<start_of_turn>user\nLaMDA<end_of_turn>\n"
        "<start_of_turn>model\nLaMDA who?<end_of_turn>\n"
    )


def test_supervised_spans_are_model_text_plus_end_of_turn():
    r = render(normalise(msgs(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")), "fold"))
    assert [r.text[a:b] for a, b in r.supervised] == ["hello<end_of_turn>", "ciao<end_of_turn>"]


def test_generation_prompt():
    r = render(normalise(msgs(("user", "hi")), "fold", allow_open_end=True), add_generation_prompt=True)
    assert r.text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_system_policies():
    m = msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    assert render(normalise(m, "fold")).text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")
    assert render(normalise(m, "drop")).text == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")
    with pytest.raises(BadRow, match="system_policy"):
        normalise(m, "error")


def test_content_is_trimmed_like_gemmas_template():
    assert normalise(msgs(("user", "  hi \n"), ("assistant", "\nyo ")), "fold") == [Turn("user", "hi"), Turn("model", "yo")]


@pytest.mark.parametrize("messages,reason", [
    (msgs(("user", "a"), ("user", "b"), ("assistant", "c")), "alternate"),
    (msgs(("assistant", "a"), ("user", "b"), ("assistant", "c")), "alternate"),
    (msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "last turn"),
    (msgs(("user", "a"), ("assistant", "  ")), "empty"),
    (msgs(("user", "a"), ("robot", "b")), "unknown role"),
    (msgs(("user", "a"), ("assistant", "b"), ("system", "late"), ("user", "c"), ("assistant", "d")), "after the conversation"),
    (msgs(("user", "a <end_of_turn> b"), ("assistant", "c")), "control marker"),
    (msgs(("user", "a"), ("assistant", "<|im_start|>assistant\nb")), "control marker"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "not text"),
    ([], "no messages"),
    (msgs(("system", "only system")), "no user or model"),
])
def test_bad_conversations(messages, reason):
    with pytest.raises(BadRow, match=reason):
        normalise(messages, "fold")


def test_supervision_mask_on_offsets():
    spans = [(5, 10), (20, 25)]
    offsets = [(0, 5), (5, 7), (7, 10), (10, 12), (3, 6), (20, 25), (25, 26), (0, 0)]
    assert supervision_mask(offsets, spans) == [False, True, True, False, False, True, False, False]


def test_saved_chat_template_renders_what_we_train(tokenizer):
    """apply_chat_template (used by transformers/TGI/vLLM at serving time) == our renderer, system fold included."""
    for m in (msgs(("user", "Hi"), ("assistant", "Hello."), ("user", "More?"), ("assistant", "Sure.")),
              msgs(("system", "Be brief."), ("user", " Hi "), ("assistant", "Hello."))):
        ours = render(normalise(m, "fold")).text
        theirs = tokenizer.apply_chat_template(m, tokenize=False)
        assert theirs == ours
    prompt = msgs(("system", "Be brief."), ("user", "Hi"))
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == render(
        normalise(prompt, "fold", allow_open_end=True), add_generation_prompt=True).text


@pytest.mark.parametrize("token", ["<eos>", "<bos>", "<pad>", "<unk>", "<start_of_image>", "<unused7>"])
def test_special_tokens_inside_content_are_refused(token):
    """The tokenizer would read them as control tokens: an end of sequence or padding learned mid-answer."""
    with pytest.raises(BadRow, match="control marker"):
        normalise(msgs(("user", "a"), ("assistant", f"b {token} c")), "fold")
