"""movekd.functional against hand-computed cases (paper Eq. 2-4, official balance loss)."""

import math

import pytest
import torch

from movekd.functional import balance_loss, kd_loss, kd_loss_per_teacher, teacher_weight, token_weight, token_weight_qv


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- token weight (Eq. 3)
def _attn() -> torch.Tensor:
    # B=1, H=2, 1+N=3; only the CLS query row (index 0) matters
    attn = torch.full((1, 2, 3, 3), 1.0 / 3)
    attn[0, 0, 0] = torch.tensor([0.5, 0.3, 0.2])
    attn[0, 1, 0] = torch.tensor([0.1, 0.6, 0.3])
    return attn  # head mean of the CLS row: [0.3, 0.45, 0.25]


def test_token_weight_official_double_softmax():
    w = token_weight(_attn())
    # softmax([0.45, 0.25]) = [sigmoid(0.2), sigmoid(-0.2)]
    assert w.dtype == torch.float32 and w.shape == (1, 2)
    torch.testing.assert_close(w, torch.tensor([[_sigmoid(0.2), _sigmoid(-0.2)]]), rtol=0, atol=1e-6)


def test_token_weight_renorm_and_cls_row_input():
    w = token_weight(_attn(), mode="renorm")
    torch.testing.assert_close(w, torch.tensor([[0.45 / 0.7, 0.25 / 0.7]]), rtol=0, atol=1e-6)
    # the CLS query rows alone give the same result
    torch.testing.assert_close(token_weight(_attn()[:, :, 0]), token_weight(_attn()))
    with pytest.raises(ValueError, match="mode"):
        token_weight(_attn(), mode="nope")


def test_token_weight_bf16_input_is_computed_in_float32():
    attn = torch.softmax(torch.randn(2, 4, 577, 577), -1)
    w = token_weight(attn.bfloat16())
    assert w.dtype == torch.float32
    # reference: same bf16-rounded values, computed in float64
    ref = torch.softmax(attn.bfloat16().double()[:, :, 0, 1:].mean(1), -1).float()
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-9)
    # the weights are near uniform but not all equal (bf16 arithmetic would collapse them)
    assert w.std() > 0


def test_token_weight_qv_is_eq3():
    q = torch.tensor([[[1.0, 0.0]]])  # B=1, H=1, d_h=2
    v = torch.tensor([[[[2.0, 0.0], [0.0, 5.0]]]])  # two patches
    w = token_weight_qv(q, v)  # logits [2, 0] / sqrt(2)
    torch.testing.assert_close(w, torch.tensor([[_sigmoid(2 / math.sqrt(2)), _sigmoid(-2 / math.sqrt(2))]]))


# ---------------------------------------------------------------- teacher weight (Eq. 4)
def _teachers(k1_tokens, k2_tokens):
    clip = torch.randn(1, 2, 2)  # teacher 0's own tokens: its score is not used
    return [clip, torch.tensor([k1_tokens]), torch.tensor([k2_tokens])]


def test_teacher_weight_flatten_fires_above_0_8():
    cls = torch.tensor([[1.0, 0.0]])
    # scores: mean <cls, t> = 2 (teacher 1), 0 (teacher 2) -> p = [0.8808, 0.1192] > 0.8 -> softmax again
    w = teacher_weight(cls, _teachers([[1.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]))
    p1 = _sigmoid(2.0)
    q1 = _sigmoid(p1 - (1 - p1))
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.2 * q1, 0.2 * (1 - q1)]]), rtol=0, atol=1e-6)
    assert abs(w.sum().item() - 1.0) < 1e-6


def test_teacher_weight_no_flatten_below_0_8():
    cls = torch.tensor([[1.0, 0.0]])
    # scores 1 and 0 -> p = [0.7311, 0.2689], max <= 0.8 -> kept
    w = teacher_weight(cls, _teachers([[1.0, 5.0], [1.0, -5.0]], [[0.0, 1.0], [0.0, 2.0]]))
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.2 * _sigmoid(1.0), 0.2 * _sigmoid(-1.0)]]), rtol=0, atol=1e-6)
    # the hack can be switched off
    w_off = teacher_weight(cls, _teachers([[1.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]), flatten_threshold=None)
    torch.testing.assert_close(w_off[0, 1], torch.tensor(0.2 * _sigmoid(2.0)))


def test_teacher_weight_flatten_is_a_batch_condition():
    cls = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t1 = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    t2 = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
    # each sample alone is peaked (0.88 > 0.8) but the batch mean is [0.5, 0.5]: no flatten
    w = teacher_weight(cls, [torch.zeros(2, 1, 2), t1, t2])
    torch.testing.assert_close(w[0], torch.tensor([0.8, 0.2 * _sigmoid(2.0), 0.2 * _sigmoid(-2.0)]))
    alone = teacher_weight(cls[:1], [torch.zeros(1, 1, 2), t1[:1], t2[:1]])
    assert not torch.allclose(alone[0], w[0])


def test_teacher_weight_uniform_single_and_scale():
    cls = torch.randn(3, 4)
    toks = [torch.randn(3, 5, 4) for _ in range(4)]
    torch.testing.assert_close(teacher_weight(cls, toks, alpha=0.7, adaptive=False),
                               torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(3, 4))
    torch.testing.assert_close(teacher_weight(cls, toks[:1]), torch.ones(3, 1))
    cls1 = torch.tensor([[1.0, 0.0]])
    w = teacher_weight(cls1, _teachers([[1.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]), scale=0.5)
    torch.testing.assert_close(w[0, 1], torch.tensor(0.2 * _sigmoid(1.0)))  # scores halved: no flatten


def test_teacher_weight_gradient_reaches_adapted_tokens():
    cls = torch.randn(2, 4)
    toks = [torch.randn(2, 3, 4)] + [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    w = teacher_weight(cls, toks)
    w[:, 1].sum().backward()
    assert toks[1].grad is not None and toks[1].grad.abs().sum() > 0


# ---------------------------------------------------------------- KD loss (Eq. 2)
def _kd_case():
    student = torch.zeros(1, 2, 2)
    t1 = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])  # per-token MSE [1, 4]
    t2 = torch.tensor([[[0.0, 0.0], [1.0, 3.0]]])  # per-token MSE [0, 5]
    return student, [t1, t2]


def test_kd_loss_hand_computed():
    s, ts = _kd_case()
    torch.testing.assert_close(kd_loss(s, ts), torch.tensor(2.5))  # uniform 1/K, mean over tokens
    w_tok = torch.tensor([[0.25, 0.75]])
    # L1 = 2.5 + 0.25*1 + 0.75*4 = 5.75; L2 = 2.5 + 0 + 0.75*5 = 6.25
    torch.testing.assert_close(kd_loss_per_teacher(s, ts, w_tok), torch.tensor([[5.75, 6.25]]))
    w_tea = torch.tensor([[0.8, 0.2]])
    torch.testing.assert_close(kd_loss(s, ts, w_tok, w_tea), torch.tensor(0.8 * 5.75 + 0.2 * 6.25))
    torch.testing.assert_close(kd_loss(s, ts, w_tok, w_tea, reduction="none"), torch.tensor([[4.6, 1.25]]))


def test_kd_loss_batch_mean_and_shape_errors():
    s, ts = _kd_case()
    s2 = torch.cat([s, s])
    ts2 = [torch.cat([t, 2 * t]) for t in ts]  # second sample: 4x the MSE
    torch.testing.assert_close(kd_loss(s2, ts2), torch.tensor((2.5 + 10.0) / 2))
    with pytest.raises(ValueError, match="teacher 1"):
        kd_loss(s, [ts[0], torch.zeros(1, 3, 2)])
    with pytest.raises(ValueError, match="teacher_weight"):
        kd_loss(s, ts, teacher_weight=torch.ones(1, 3))


def test_kd_loss_bf16_inputs_promoted():
    s = torch.randn(2, 16, 8)
    t = [torch.randn(2, 16, 8)]
    out = kd_loss(s.bfloat16(), [x.bfloat16() for x in t])
    assert out.dtype == torch.float32
    ref = (s.bfloat16().double() - t[0].bfloat16().double()).square().mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- balance loss
def test_balance_loss_hand_computed_and_gradient():
    p = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]], requires_grad=True)
    loss = balance_loss([p])
    # argmax freq [0.75, 0.25]; mean p [0.65, 0.35]
    torch.testing.assert_close(loss, torch.tensor(0.65 * 0.75 + 0.35 * 0.25))
    loss.backward()
    # the one-hot frequency is detached: d loss / d p[t, e] = freq_e / S
    torch.testing.assert_close(p.grad, torch.tensor([[0.75 / 4, 0.25 / 4]]).expand(1, 4, 2).contiguous())


def test_balance_loss_layers_samples_and_bounds():
    balanced = torch.tensor([[[0.6, 0.4], [0.4, 0.6]]])
    torch.testing.assert_close(balance_loss(balanced), torch.tensor(0.5))  # 1/E, no x E factor
    collapsed = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(balance_loss(collapsed), torch.tensor(1.0))
    # per sample, not pooled over the batch: two opposite collapsed samples still score 1
    torch.testing.assert_close(balance_loss(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])), torch.tensor(1.0))
    # layers of different lengths are concatenated over tokens (each token counts once)
    l1 = torch.tensor([[[1.0, 0.0]]])
    l2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    torch.testing.assert_close(balance_loss([l1, l2]), torch.tensor(0.25 * 0.25 + 0.75 * 0.75))
    with pytest.raises(ValueError, match="no router"):
        balance_loss([])


def test_text_token_weight_formula_and_masking():
    from movekd.functional import text_token_weight

    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # third token masked out
    visual = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    w = text_token_weight(visual, text, mask, temperature=0.5)
    s = torch.tensor([0.5, 0.5, -0.5, 2 ** -0.5])  # mean cosine over the two unmasked text tokens
    assert torch.allclose(w[0], torch.softmax(s / 0.5, dim=0))
    # No text token: uniform.
    assert torch.allclose(text_token_weight(visual, text, torch.zeros(1, 3, dtype=torch.bool)), torch.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="text_mask"):
        text_token_weight(visual, text, mask[:, :2])
