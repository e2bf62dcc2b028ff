// The tiny tokenizer and models the targets run their inputs against, and the seed generator
// writes files for.
#pragma once

#include "qalora/model/model.h"
#include "qalora/tokenizer/tokenizer.h"

namespace qalora::fuzz {

// SentencePiece with byte fallback: <unk> <s> </s>, the 256 byte tokens, a few pieces and the
// ChatML markers, with a ChatML chat template.
TokenizerData tiny_tokenizer_data();
const Tokenizer& tiny_tokenizer();

// A random one-block model (dim 8, tied embeddings) carrying tiny_tokenizer(): dense, or with
// every linear RTN 4-bit in groups of 8 (a base QA-LoRA adapters can load onto).
const Model& tiny_model(bool quantized);

}  // namespace qalora::fuzz
