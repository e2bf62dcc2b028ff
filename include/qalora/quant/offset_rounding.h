// Storing an affine model's group offsets on a coarser grid than fp32, with GPTQ's error
// feedback (docs/export.md § Offsets).
//
// A merged QA-LoRA model keeps its codes and scales, but its offsets m are arbitrary fp32
// values; GGUF's Q4_1 stores them in fp16, a GPTQ checkpoint as integer zero points (m = -s z).
// Moving the offset of a group by d moves all of the group's weights by d, so each output sees
// d times the sum of the group's inputs: one error shared by the whole group, which costs far
// more than the independent rounding of codes. With H the second moments of those group sums
// ([L, L] for L groups), the offsets of a row are rounded one group at a time and each rounding
// error is pushed onto the groups not yet rounded through H's inverse Cholesky factor (GPTQ's
// update, on L columns), which keeps sum over rows of dm^T H dm small.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "qalora/model/model.h"
#include "qalora/quant/qmatrix.h"

namespace qalora {

struct OffsetGrid {
  enum class Kind : uint8_t {
    Fp16,        // GGUF Q4_1: any fp16 value
    ZeroPoints,  // GPTQ: -s z with z an integer in [zmin, 2^bits - 1]
  };
  Kind kind = Kind::Fp16;
  int zmin = 0;  // ZeroPoints: GPTQ v1 checkpoints store z - 1 and cannot hold 0

  // The grid value nearest to the offset m of a group with scale s of a `bits`-bit matrix.
  float nearest(float m, float s, int bits) const;
};

// GPTQ's zero point for the offset m of a group with scale s: round(-m / s) clamped to
// [zmin, 2^bits - 1]; 2^(bits - 1) for s = 0, where every z decodes to 0.
int zero_point(float m, float s, int bits, int zmin);

// Second moments of the group sums of the inputs of every affine block linear with contiguous
// groups, as HessianAccumulator builds them (2/n sum p p^T, [L, L]), from running `model` on
// `windows` (each from position 0). Indexed layer * kNumTargets + target; empty for the other
// linears.
std::vector<std::vector<double>> pooled_input_hessians(
    const Model& model, std::span<const std::vector<int32_t>> windows);

struct OffsetRounding {
  int64_t linears = 0;        // linears whose offsets were rounded
  double max_abs_dm = 0;      // over every offset: |stored - model's|
  double output_error = 0;    // sum over rows of dm^T H dm (with Hessians; else 0)
  double nearest_error = 0;   // the same for every offset rounded to its nearest grid value
};

// Rounds the offsets of `q` onto `grid` in place: with `H` ([L, L], from pooled_input_hessians)
// one group at a time with error feedback, otherwise each to its nearest grid value. Adds to
// `report`. Throws Error for a matrix that is not affine with contiguous groups, or an H of the
// wrong size.
void round_offsets(QMatrix& q, const OffsetGrid& grid, const std::vector<double>* H,
                   OffsetRounding& report, double damp = 0.01);

// The block linears for which `stored(q)` holds that have an offset off `grid`.
int64_t offsets_off_grid(const Model& model, const OffsetGrid& grid,
                         const std::function<bool(const QMatrix&)>& stored);

// round_offsets on every block linear for which `stored(q)` holds (those a format keeps as
// codes), with its Hessian from `hessians` when given.
OffsetRounding round_model_offsets(Model& model, const OffsetGrid& grid,
                                   const std::vector<std::vector<double>>* hessians,
                                   const std::function<bool(const QMatrix&)>& stored);

}  // namespace qalora
