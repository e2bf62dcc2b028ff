// SentencePiece tokenizer.model: a serialized ModelProto, read with a minimal protobuf
// wire-format parser. Only BPE models with the identity normalizer are accepted, since other
// normalizers (NFKC charsmaps, whitespace folding) would need more than this tokenizer does.
#include <cstring>

#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/tokenizer/bpe.h"

namespace qalora {
namespace {

// Field numbers of sentencepiece_model.proto.
enum : uint32_t {
  kModelPieces = 1,
  kModelTrainerSpec = 2,
  kModelNormalizerSpec = 3,
  kPiecePiece = 1,
  kPieceScore = 2,
  kPieceType = 3,
  kTrainerModelType = 3,
  kTrainerByteFallback = 35,
  kTrainerUnkId = 40,
  kTrainerBosId = 41,
  kTrainerEosId = 42,
  kTrainerPadId = 43,
  kNormName = 1,
  kNormCharsmap = 2,
  kNormAddDummyPrefix = 3,
  kNormRemoveExtraWhitespaces = 4,
  kNormEscapeWhitespaces = 5,
};
constexpr uint64_t kModelTypeBpe = 2;

struct WireField {
  uint32_t number = 0;
  uint32_t wire_type = 0;
  uint64_t varint = 0;     // wire type 0
  uint32_t fixed32 = 0;    // wire type 5
  std::string_view bytes;  // wire type 2
};

// Reads the fields of one message; `where` names the message for errors ("pieces[12]").
class WireReader {
 public:
  WireReader(std::string_view data, const std::string& path, std::string where)
      : data_(data), path_(path), where_(std::move(where)) {}

  bool next(WireField& f) {
    if (pos_ == data_.size()) return false;
    const uint64_t key = varint();
    f = WireField{};
    f.number = static_cast<uint32_t>(key >> 3);
    f.wire_type = static_cast<uint32_t>(key & 7);
    switch (f.wire_type) {
      case 0:
        f.varint = varint();
        break;
      case 1:
        skip(8, f.number);
        break;
      case 2: {
        const uint64_t len = varint();
        need(len, f.number);
        f.bytes = data_.substr(pos_, static_cast<size_t>(len));
        pos_ += static_cast<size_t>(len);
        break;
      }
      case 5:
        need(4, f.number);
        std::memcpy(&f.fixed32, data_.data() + pos_, 4);
        pos_ += 4;
        break;
      default:
        fail(path_, ": ", where_, " field ", f.number,
             ": expected protobuf wire type 0, 1, 2 or 5, got ", f.wire_type, " at offset ", pos_,
             " (not a SentencePiece model?)");
    }
    return true;
  }

  // Checks that field f has the wire type its schema gives.
  void expect(const WireField& f, uint32_t wire_type, const char* name) const {
    QL_CHECK(f.wire_type == wire_type, path_, ": ", where_, ".", name,
             ": expected protobuf wire type ", wire_type, ", got ", f.wire_type,
             " (not a SentencePiece model?)");
  }

 private:
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      QL_CHECK(pos_ < data_.size(), path_, ": ", where_, ": expected a varint at offset ", pos_,
               ", but the message ends there (truncated file?)");
      const auto b = static_cast<uint8_t>(data_[pos_++]);
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    fail(path_, ": ", where_, ": expected a varint of at most 10 bytes at offset ", pos_,
         ", got a longer one");
  }
  void need(uint64_t n, uint32_t field) const {
    QL_CHECK(n <= data_.size() - pos_, path_, ": ", where_, " field ", field, ": expected ", n,
             " bytes at offset ", pos_, ", but only ", data_.size() - pos_,
             " remain (truncated file?)");
  }
  void skip(size_t n, uint32_t field) {
    need(n, field);
    pos_ += n;
  }

  std::string_view data_;
  const std::string& path_;
  std::string where_;
  size_t pos_ = 0;
};

// proto int32 fields carry negatives as sign-extended 64-bit varints.
int32_t as_int32(uint64_t v) {
  return static_cast<int32_t>(static_cast<int64_t>(v));
}

}  // namespace

TokenizerData read_sentencepiece_model(const std::filesystem::path& path) {
  const std::string p = path.string();
  const std::string bytes = read_file(path);
  TokenizerData d;
  d.kind = TokenizerKind::SentencePiece;
  d.unk_id = 0, d.bos_id = 1, d.eos_id = 2, d.pad_id = -1;  // TrainerSpec defaults
  uint64_t model_type = 1;                                  // default UNIGRAM
  std::string normalizer = "nmt_nfkc";
  bool has_charsmap = false, remove_extra_ws = true, escape_ws = true;

  WireReader model(bytes, p, "ModelProto");
  WireField f;
  while (model.next(f)) {
    if (f.number == kModelPieces) {
      model.expect(f, 2, "pieces");
      const std::string where = cat("pieces[", d.tokens.size(), "]");
      WireReader piece(f.bytes, p, where);
      WireField g;
      std::string text;
      float score = 0;
      uint64_t type = 1;  // NORMAL
      while (piece.next(g)) {
        if (g.number == kPiecePiece) {
          piece.expect(g, 2, "piece");
          text = g.bytes;
        } else if (g.number == kPieceScore) {
          piece.expect(g, 5, "score");
          std::memcpy(&score, &g.fixed32, 4);
        } else if (g.number == kPieceType) {
          piece.expect(g, 0, "type");
          type = g.varint;
        }
      }
      QL_CHECK(type >= 1 && type <= 6, p, ": ", where, ".type: expected 1..6 (NORMAL..BYTE), got ",
               type);
      d.tokens.push_back(std::move(text));
      d.scores.push_back(score);
      d.types.push_back(static_cast<TokenType>(type));
    } else if (f.number == kModelTrainerSpec) {
      model.expect(f, 2, "trainer_spec");
      WireReader spec(f.bytes, p, "trainer_spec");
      WireField g;
      while (spec.next(g)) {
        if (g.wire_type != 0) continue;
        switch (g.number) {
          case kTrainerModelType:
            model_type = g.varint;
            break;
          case kTrainerUnkId:
            d.unk_id = as_int32(g.varint);
            break;
          case kTrainerBosId:
            d.bos_id = as_int32(g.varint);
            break;
          case kTrainerEosId:
            d.eos_id = as_int32(g.varint);
            break;
          case kTrainerPadId:
            d.pad_id = as_int32(g.varint);
            break;
          default:
            break;  // byte_fallback needs no flag: byte pieces are used when present
        }
      }
    } else if (f.number == kModelNormalizerSpec) {
      model.expect(f, 2, "normalizer_spec");
      WireReader spec(f.bytes, p, "normalizer_spec");
      WireField g;
      while (spec.next(g)) {
        switch (g.number) {
          case kNormName:
            normalizer = g.bytes;
            break;
          case kNormCharsmap:
            has_charsmap = !g.bytes.empty();
            break;
          case kNormAddDummyPrefix:
            d.add_space_prefix = g.varint != 0;
            break;
          case kNormRemoveExtraWhitespaces:
            remove_extra_ws = g.varint != 0;
            break;
          case kNormEscapeWhitespaces:
            escape_ws = g.varint != 0;
            break;
          default:
            break;
        }
      }
    }
  }
  QL_CHECK(model_type == kModelTypeBpe, p, ": trainer_spec.model_type: expected 2 (BPE), got ",
           model_type, model_type == 1 ? " (UNIGRAM, not supported)" : "");
  QL_CHECK(!has_charsmap, p,
           ": normalizer_spec.precompiled_charsmap: expected none (identity normalizer), got ",
           "a charsmap for \"", normalizer, "\" (not supported)");
  QL_CHECK(!remove_extra_ws, p,
           ": normalizer_spec.remove_extra_whitespaces: expected false, got true ",
           "(whitespace folding is not supported)");
  QL_CHECK(escape_ws, p,
           ": normalizer_spec.escape_whitespaces: expected true, got false (not supported)");
  d.add_bos = d.bos_id >= 0;
  d.add_eos = false;
  validate_tokenizer_data(d, p);
  return d;
}

}  // namespace qalora
