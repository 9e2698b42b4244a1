"""FNet mixing in HF seq2seq (T5, BART) and decoder-only (GPT-2) models: scope, untouched decoders, padding
invariance through cross-attention, causality, generation with the Fourier layers' cache, and loading modules pickled
before ``CallConvention``."""

import pickle

import pytest
import torch
from transformers import (
    GPT2Model,
    T5Config,
    T5ForConditionalGeneration,
)

from algos import apply_fnet_mixing
from algos.fnet import FourierMixing, FourierSeqAttention
from algos.fnet.adapters import BartConvention, GPT2Convention, T5Convention, keep_mask
from tests.helpers import tiny_bart, tiny_gpt2


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                               num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def decoder_side(model):
    """Every decoder module and its parameters (decoder self-attention, cross-attention, the rest)."""
    decoder = model.get_decoder()
    return dict(decoder.named_modules()), {name: p.detach().clone() for name, p in decoder.named_parameters()}


@pytest.mark.parametrize("make", [tiny_bart, tiny_t5], ids=["bart", "t5"])
def test_encoder_scope_swaps_encoder_self_attention_only(make):
    model = make()
    modules, weights = decoder_side(model)
    report = apply_fnet_mixing(model, impl="rfft", padding="mask", max_length=64)
    encoder_attention = [name for name, m in model.get_encoder().named_modules() if isinstance(m, FourierSeqAttention)]
    assert len(report.replaced) == len(encoder_attention) == 3
    assert all(".encoder." in f".{row.fqn}" for row in report.replaced)
    # every decoder module is the very same object, with the same weights; cross-attention included
    assert dict(model.get_decoder().named_modules()) == modules
    assert all(torch.equal(p, weights[name]) for name, p in model.get_decoder().named_parameters())
    reasons = {skip.reason.split(" (")[0].split(",")[0] for skip in report.skipped}
    assert reasons == {"cross-attention stays attention", "decoder self-attention"}
    assert not any(isinstance(m, FourierSeqAttention) for m in model.get_decoder().modules())


@pytest.mark.parametrize("make", [tiny_bart, tiny_t5], ids=["bart", "t5"])
def test_outputs_do_not_depend_on_encoder_padding(make):
    """padding='mask': the encoder's real positions ignore the pads, and cross-attention masks them, so the decoder's
    logits are the same however much padding the source carries."""
    model = make()
    apply_fnet_mixing(model, impl="rfft", padding="mask", max_length=64, keep_attention_layers=[-1])
    source = torch.randint(4, 64, (2, 11))
    target = torch.randint(4, 64, (2, 5))
    short = model(input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=target).logits
    worst = 0.0
    for pads in (3, 20):
        padded = torch.cat([source, torch.zeros(2, pads, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones_like(source), torch.zeros(2, pads, dtype=torch.long)], 1)
        logits = model(input_ids=padded, attention_mask=mask, decoder_input_ids=target).logits
        torch.testing.assert_close(logits, short, atol=2e-5, rtol=1e-4)
        worst = max(worst, (logits - short).abs().max().item())
    # the paper's padding="ignore" does see the pads: the check above can fail
    plain = make()
    apply_fnet_mixing(plain, impl="rfft")
    padded = torch.cat([source, torch.zeros(2, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones_like(source), torch.zeros(2, 3, dtype=torch.long)], 1)
    leak = (plain(input_ids=padded, attention_mask=mask, decoder_input_ids=target).logits
            - plain(input_ids=source, decoder_input_ids=target).logits).abs().max().item()
    assert leak > 10 * max(worst, 1e-6)


def future_gradient(model, length=12, **inputs):
    """|d logits[t] / d input[s]| summed over s > t, for every t: zero iff nothing looks ahead."""
    embeddings = model.get_input_embeddings()(torch.randint(4, 64, (1, length))).detach().requires_grad_(True)
    total = 0.0
    for t in range(length - 1):
        logits = model(inputs_embeds=embeddings, **inputs).logits if not inputs else model(
            decoder_inputs_embeds=embeddings, **inputs).logits
        (gradient,) = torch.autograd.grad(logits[0, t].sum(), embeddings)
        total += gradient[0, t + 1:].abs().sum().item()
    return total


def test_decoder_mixing_never_looks_ahead():
    gpt = tiny_gpt2()
    apply_fnet_mixing(gpt, impl="dft", causal=True, scope="decoder", keep_attention_layers=[-1])
    assert future_gradient(gpt) == 0.0
    bart = tiny_bart()
    report = apply_fnet_mixing(bart, impl="dft", causal=True, scope="all")
    assert len(report.replaced) == 5  # 3 encoder + 2 decoder self-attentions; cross-attention stays
    source = torch.randint(4, 64, (1, 9))
    assert future_gradient(bart, input_ids=source) == 0.0
    # the check can fail: non-causal mixing in a decoder would look ahead
    leaky = tiny_gpt2()
    for block in leaky.transformer.h:
        block.attn = FourierSeqAttention(FourierMixing("dft", norm="ortho"), GPT2Convention(), block.attn.layer_idx)
    assert future_gradient(leaky) > 0


def test_gpt2_generation_with_the_fourier_cache_matches_full_recomputation():
    gpt = tiny_gpt2()
    apply_fnet_mixing(gpt, impl="dft", causal=True, scope="decoder", keep_attention_layers=[-1])
    prompt = torch.randint(4, 64, (2, 7))
    cached = gpt.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                          do_sample=False, pad_token_id=0)
    recomputed = gpt.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape == (2, 17) and torch.equal(cached, recomputed)
    # one step with the cache gives the full pass's logits for the new position
    out = gpt(cached[:, :-1], use_cache=True)
    step = gpt(cached[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, gpt(cached).logits[:, -1], atol=1e-5, rtol=1e-4)
    # beam search reorders the cache, Fourier slots included
    beams = gpt.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, num_beams=3,
                         do_sample=False, pad_token_id=0)
    assert beams.shape[0] == 2 and beams.shape[1] > 7


@pytest.mark.parametrize("make", [tiny_bart, tiny_t5], ids=["bart", "t5"])
def test_seq2seq_with_fnet_encoder_generates(make):
    model = make()
    apply_fnet_mixing(model, impl="rfft", padding="mask", max_length=64)
    source = torch.randint(4, 64, (2, 9))
    out = model.generate(source, attention_mask=torch.ones_like(source), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False)
    assert out.shape == (2, 7) and (out[:, 1:] < 64).all()


def test_scope_errors_are_one_line():
    with pytest.raises(ValueError, match=r"scope='decoders' is not one of 'encoder', 'decoder', 'all'"):
        apply_fnet_mixing(tiny_gpt2(), scope="decoders")
    with pytest.raises(ValueError, match=r"scope='all' mixes decoder self-attention.*pass causal=True"):
        apply_fnet_mixing(tiny_bart(), scope="all")
    with pytest.raises(ValueError, match=r"causal=True runs on impl='dft'"):
        apply_fnet_mixing(tiny_gpt2(), scope="decoder", causal=True)
    # a decoder-only model has no encoder: the default scope changes nothing, and says why
    with pytest.raises(ValueError, match=r"all 3 selected modules were skipped .*decoder self-attention, outside "
                                         r"scope='encoder'"):
        apply_fnet_mixing(tiny_gpt2(), strict=True)
    with pytest.raises(ValueError, match="causal mixing caches into a DynamicCache"):
        gpt = tiny_gpt2()
        apply_fnet_mixing(gpt, impl="dft", causal=True, scope="decoder")
        prompt = torch.randint(4, 64, (1, 4))
        gpt.generate(prompt, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def left_padded(prompts, pad=0):
    """A left-padded batch (as a tokenizer with padding_side="left" gives) and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    return ids, mask


def mixed_gpt2():
    gpt = tiny_gpt2()
    apply_fnet_mixing(gpt, impl="dft", causal=True, scope="decoder", keep_attention_layers=[-1])
    return gpt


def test_causal_mixing_of_a_left_padded_batch_equals_each_prompt_alone():
    """Each row's real tokens are mixed from its first real token on (pads zeroed), so with the position_ids
    generate derives from the mask, a left-padded row gives the logits of its prompt alone."""
    gpt = mixed_gpt2()
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(4, 64, (n,), generator=generator) for n in (3, 9, 6)]
    ids, mask = left_padded(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = gpt(ids, attention_mask=mask, position_ids=positions).logits
    for row, prompt in enumerate(prompts):
        alone = gpt(prompt[None]).logits[0]
        torch.testing.assert_close(padded[row, -len(prompt):], alone, atol=1e-5, rtol=1e-4)
    # one cached step after the padded prefix: the new token's position is offset per row too
    out = gpt(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    new = torch.randint(4, 64, (3, 1), generator=generator)
    step = gpt(new, attention_mask=torch.cat([mask, torch.ones_like(new)], 1), position_ids=positions[:, -1:] + 1,
               past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(step[row], gpt(torch.cat([prompt, new[row]])[None]).logits[0, -1], atol=1e-5,
                                   rtol=1e-4)


def test_greedy_generation_of_a_left_padded_batch_equals_each_prompt_alone():
    gpt = mixed_gpt2()
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 64, (n,), generator=generator) for n in (3, 8)]
    options = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    alone = [gpt.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **options)[0, len(p):]
             for p in prompts]
    ids, mask = left_padded(prompts)
    for use_cache in (True, False):
        batch = gpt.generate(ids, attention_mask=mask, use_cache=use_cache, **options)[:, ids.shape[1]:]
        assert torch.equal(batch[0], alone[0]) and torch.equal(batch[1], alone[1]), use_cache


def test_causal_keep_mask_reads_the_newest_query():
    """On CUDA, HF's sdpa lets fully masked query rows (a left pad's own) attend everywhere; the keys a causal layer
    keeps are read from the last query row, which is never fully masked, so the pads stay pads."""
    from transformers.modeling_attn_mask_utils import AttentionMaskConverter

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    causal = GPT2Model._prepare_4d_causal_attention_mask_with_cache_position(
        mask, sequence_length=5, target_length=5, dtype=torch.float32, cache_position=torch.arange(5), batch_size=2)
    unmasked = AttentionMaskConverter._unmask_unattended(causal, torch.finfo(torch.float32).min)
    assert not torch.equal(unmasked, causal)  # the pads' rows now attend everywhere
    for form in (causal, unmasked, mask):
        assert torch.equal(keep_mask(form, None, causal=True), mask.bool())


@pytest.mark.parametrize("convention", [T5Convention(), BartConvention(), GPT2Convention()], ids=lambda c: c.name)
def test_a_module_pickled_with_its_family_name_resumes_with_its_convention(convention):
    """Checkpoints saved before ``CallConvention`` hold FourierSeqAttention with ``family="t5"`` (or "bart", "gpt2")
    in place of ``convention``: unpickled, it answers as the module built today."""
    new = FourierSeqAttention(FourierMixing("dft", causal=True, norm="ortho", max_length=16), convention, 0)
    saved = pickle.loads(pickle.dumps(new))
    vars(saved)["family"] = vars(saved).pop("convention").name  # the state as it was pickled then
    loaded = pickle.loads(pickle.dumps(saved))
    assert "family" not in vars(loaded) and type(loaded.convention) is type(convention)
    x, mask = torch.randn(2, 5, 8), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    answer, expected = loaded(x, **{convention.mask_keyword: mask}), new(x, **{convention.mask_keyword: mask})
    assert len(answer) == len(expected) and torch.equal(answer[0], expected[0])
    assert all(a is None and e is None for a, e in zip(answer[1:], expected[1:], strict=True))
