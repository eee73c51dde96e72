// The C++ CPU kernels, as csrc/ops.cpp registers them for the CPU dispatch key. Each takes validated
// inputs (ladder_kernels/ops/<op>.py checks shapes, dtypes and devices once, at the public call) and
// checks only the invariants it relies on itself. Their maths is in the comment at the top of each source.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ladder_kernels {
namespace cpu {

using at::Tensor;

// csrc/cpu/gated_fusion.cpp
std::tuple<Tensor, Tensor> gated_fusion_fwd(const Tensor& side, const Tensor& tap, const Tensor& weight,
                                            const std::optional<Tensor>& bias, const Tensor& mu, bool save_diff);
// (d_side, d_tap, d_weight, d_bias, d_gate): the whole backward in one call; unneeded ones come back empty.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_fusion_bwd(
    const Tensor& grad, const std::optional<Tensor>& diff, const std::optional<Tensor>& tap,
    const std::optional<Tensor>& tap_scale, const std::optional<Tensor>& weight, const Tensor& mu,
    double temperature, bool scalar_gate, bool need_side, bool need_tap, bool need_weight, bool need_bias,
    bool need_gate);

// csrc/cpu/assemble_prompts.cpp
Tensor assemble_prompts_fwd(const Tensor& prefix, const Tensor& suffix, const Tensor& base,
                            const std::optional<Tensor>& lowrank_a, const std::optional<Tensor>& lowrank_b,
                            const std::optional<Tensor>& pos, double scale, double dropout, const Tensor& seed);
Tensor assemble_prompts_reduce(const Tensor& grad, int64_t start, int64_t end);

// csrc/cpu/apt_diffusion.cpp
std::tuple<Tensor, Tensor> apt_diffusion_fwd(const Tensor& hidden, const Tensor& attn_out, const Tensor& prompts,
                                             const Tensor& kt, const Tensor& log_scale, const Tensor& seed,
                                             double dropout);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> apt_diffusion_bwd(
    const Tensor& grad, const std::optional<Tensor>& hidden, const std::optional<Tensor>& out,
    const Tensor& prompts, const Tensor& kt, const Tensor& log_scale, const std::optional<Tensor>& w,
    const Tensor& seed, double dropout, bool need_h, bool need_y, bool need_p, bool need_kt, bool need_s);

}  // namespace cpu
}  // namespace ladder_kernels
