"""sweep/profile.py: a real CPU trace of a jitted function summed by kind of work."""

# ruff: noqa: E501  (HLO text lines are long)

import jax
import jax.numpy as jnp
import numpy as np

from raddino_jax.sweep import profile

HLO = """HloModule jit_step, is_scheduled=true

%fused_computation (param_0: f32[4,8], param_1: f32[8,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.4 = f32[4,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(block)/dot_general"}
}

%fused_transpose (param_0.1: f32[4,8]) -> f32[8,4] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = f32[8,4]{0,1} transpose(%param_0.1), dimensions={1,0}
}

ENTRY %main (p0: f32[4,8], p1: f32[8,8]) -> (f32[8,4], f32[4,8]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  %fusion.1 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kOutput, calls=%fused_computation, metadata={op_name="jit(step)/transpose(jvp(block))/attention/dot_general"}
  %copy_fusion = f32[8,4]{0,1} fusion(%fusion.1), kind=kLoop, calls=%fused_transpose
  %cc = (f32[4,8]{1,0}, u8[0]{0}) custom-call(%p0), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(block)/attention/dot_product_attention"}
  %adam = f32[4,8]{1,0} multiply(%p0, %p0), metadata={op_name="jit(step)/optimizer/mul"}
  ROOT %t = (f32[8,4]{0,1}, f32[4,8]{1,0}) tuple(%copy_fusion, %adam)
}
"""


def test_parse_and_categorise_handwritten_hlo():
    ops = profile.parse_hlo_ops(HLO)
    assert ops["fusion.1"].fused >= {"dot", "parameter"}
    assert profile.categorise(ops["fusion.1"]) == "attention backward"
    assert profile.categorise(ops["copy_fusion"]) == "copies and transposes"
    assert ops["cc"].target == "__cudnn$fmhaSoftmax"
    assert profile.categorise(ops["cc"]) == "attention forward"
    assert profile.categorise(ops["adam"]) == "optimizer + EMA"
    assert profile.categorise(ops["dot.4"]) == "matmul"


def test_cpu_trace_is_summed_by_scope_and_kernel(tmp_path):
    """Every traced instruction is found in the module text, the categories add up to the
    traced time, and each scope lands in its own category."""

    def step(x, w, m):
        with jax.named_scope("heads_losses"):
            loss = jax.nn.logsumexp(x @ w, axis=-1).sum()
        h = jnp.tanh(x @ w.T)
        with jax.named_scope("optimizer"):
            m = 0.9 * m + 0.1 * jnp.sqrt(jnp.abs(m) + 1.0)
        return loss + h.sum(), m

    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 384)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(384, 384)), jnp.float32)
    m = jnp.ones((1024, 1024), jnp.float32)
    compiled = jax.jit(step).lower(x, w, m).compile()
    jax.block_until_ready(compiled(x, w, m))
    events = profile.trace_steps(lambda: jax.block_until_ready(compiled(x, w, m)), 3, tmp_path)
    ops = profile.parse_hlo_ops(compiled.as_text())
    module = profile.module_name(compiled.as_text())
    assert module == "jit_step"
    table = profile.summarise(events, ops, steps=3, module=module)
    traced = sum(e.duration_us for e in events if e.hlo_module == module) / 1e3 / 3
    assert traced > 0
    assert table["unmatched"] == 0.0
    np.testing.assert_allclose(sum(table.values()), traced, rtol=1e-9)
    assert table["heads + losses"] > 0 and table["optimizer + EMA"] > 0 and table["matmul"] > 0
    text = profile.markdown_table({"before": table, "after": table})
    assert "| optimizer + EMA |" in text and "| total |" in text and "1.00" in text
