#include "qalora/model/quant_summary.h"

namespace qalora {

QuantSummary quant_summary(const Model& model) {
  QuantSummary s;
  for (const LayerWeights& L : model.layers)
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
      ++s.linears;
      if (!l->quantized()) continue;
      if (s.quantized++ == 0) {
        s.type = quant_type_name(l->qweight.type);
        s.bits = l->qweight.bits;
      }
      s.quantized_bytes += l->qweight.storage_bytes();
      s.fp32_bytes += 4 * l->qweight.rows * l->qweight.cols;
    }
  return s;
}

}  // namespace qalora
