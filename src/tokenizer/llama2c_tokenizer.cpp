// llama2.c tokenizer files (tok*.bin): int32 max_token_length, then for each token a float
// score, an int32 byte length and the bytes. Pieces use plain spaces and BOS/EOS are stored as
// "\n<s>\n" / "\n</s>\n"; both are normalised here to SentencePiece's spelling.
#include <cstring>

#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/tokenizer/bpe.h"

namespace qalora {

TokenizerData read_llama2c_tokenizer(const std::filesystem::path& path, int32_t vocab_size) {
  const std::string p = path.string();
  QL_CHECK(vocab_size > 0, p, ": vocab_size: expected a positive count, got ", vocab_size);
  const std::string bytes = read_file(path);
  size_t pos = 0;
  const auto read = [&](void* dst, size_t n, const char* field, int32_t index) {
    QL_CHECK(pos + n <= bytes.size(), p, ": ", field, " of token ", index, ": expected ", n,
             " bytes at offset ", pos, ", but the file has ", bytes.size(), " bytes (truncated?)");
    std::memcpy(dst, bytes.data() + pos, n);
    pos += n;
  };
  int32_t max_len = 0;
  read(&max_len, sizeof max_len, "max_token_length header", -1);
  QL_CHECK(max_len > 0 && max_len < 4096, p, ": max_token_length: expected 1..4095, got ", max_len);

  TokenizerData d;
  d.kind = TokenizerKind::SentencePiece;
  d.unk_id = 0;
  d.bos_id = vocab_size > 1 ? 1 : -1;
  d.eos_id = vocab_size > 2 ? 2 : -1;
  d.add_bos = true;
  d.add_space_prefix = true;
  for (int32_t i = 0; i < vocab_size; ++i) {
    float score = 0;
    int32_t len = 0;
    read(&score, sizeof score, "score", i);
    read(&len, sizeof len, "length", i);
    QL_CHECK(len >= 0 && len <= max_len, p, ": length of token ", i, ": expected 0..", max_len,
             " (max_token_length), got ", len);
    std::string piece(static_cast<size_t>(len), '\0');
    read(piece.data(), piece.size(), "bytes", i);

    TokenType type = TokenType::Normal;
    if (i == d.unk_id) {
      type = TokenType::Unknown;
    } else if (i == d.bos_id || i == d.eos_id) {
      type = TokenType::Control;
      piece = i == d.bos_id ? "<s>" : "</s>";
    } else if (parse_byte_piece(piece) >= 0) {
      type = TokenType::Byte;
    } else {
      std::string spm;
      for (char c : piece) {
        if (c == ' ')
          spm += kSpmSpace;
        else
          spm += c;
      }
      piece = std::move(spm);
    }
    d.tokens.push_back(std::move(piece));
    d.scores.push_back(score);
    d.types.push_back(type);
  }
  QL_CHECK(pos == bytes.size(), p, ": size: expected ", pos, " bytes for ", vocab_size,
           " tokens, got ", bytes.size(), " (wrong vocab_size?)");
  validate_tokenizer_data(d, p);
  return d;
}

}  // namespace qalora
