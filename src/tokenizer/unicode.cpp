#include "qalora/tokenizer/unicode.h"

#include <algorithm>
#include <array>

namespace qalora::unicode {
namespace {

bool in_ranges(const CodePointRange* ranges, size_t count, uint32_t cp) {
  const CodePointRange* end = ranges + count;
  const CodePointRange* it = std::upper_bound(
      ranges, end, cp, [](uint32_t c, const CodePointRange& r) { return c < r.first; });
  return it != ranges && cp <= (it - 1)->last;
}

// Printable bytes map to themselves; the other 68 take U+0100.. in byte order (GPT-2's scheme).
struct Gpt2ByteMap {
  std::array<uint32_t, 256> to_char{};
  std::array<int16_t, 324> to_byte{};  // every mapped code point is below 256 + 68
  Gpt2ByteMap() {
    to_byte.fill(-1);
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      to_char[b] = printable ? b : next++;
      to_byte[to_char[b]] = static_cast<int16_t>(b);
    }
  }
};
const Gpt2ByteMap& gpt2_map() {
  static const Gpt2ByteMap map;
  return map;
}

}  // namespace

size_t utf8_sequence_length(std::string_view text, size_t pos) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  const uint8_t b0 = byte(pos);
  if (b0 < 0x80) return 1;
  size_t len;
  uint32_t min_cp;
  if ((b0 & 0xE0) == 0xC0)
    len = 2, min_cp = 0x80;
  else if ((b0 & 0xF0) == 0xE0)
    len = 3, min_cp = 0x800;
  else if ((b0 & 0xF8) == 0xF0)
    len = 4, min_cp = 0x10000;
  else
    return 0;
  if (pos + len > text.size()) return 0;
  uint32_t cp = b0 & (0x7F >> len);
  for (size_t i = 1; i < len; ++i) {
    if ((byte(pos + i) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (byte(pos + i) & 0x3F);
  }
  // Overlong forms, surrogates and values past U+10FFFF are ill-formed.
  if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

std::vector<CodePoint> decode_utf8(std::string_view text) {
  std::vector<CodePoint> out;
  out.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const size_t len = utf8_sequence_length(text, pos);
    const uint8_t b0 = static_cast<uint8_t>(text[pos]);
    if (len == 0) {
      out.push_back({kInvalidBase + b0, static_cast<uint32_t>(pos), 1});
      ++pos;
      continue;
    }
    uint32_t cp = len == 1 ? b0 : b0 & (0x7Fu >> len);
    for (size_t i = 1; i < len; ++i) cp = (cp << 6) | (static_cast<uint8_t>(text[pos + i]) & 0x3Fu);
    out.push_back({cp, static_cast<uint32_t>(pos), static_cast<uint32_t>(len)});
    pos += len;
  }
  return out;
}

void append_utf8(std::string& out, uint32_t cp) {
  const auto put = [&](uint32_t v) { out.push_back(static_cast<char>(v)); };
  if (cp < 0x80) {
    put(cp);
  } else if (cp < 0x800) {
    put(0xC0 | (cp >> 6));
    put(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    put(0xE0 | (cp >> 12));
    put(0x80 | ((cp >> 6) & 0x3F));
    put(0x80 | (cp & 0x3F));
  } else {
    put(0xF0 | (cp >> 18));
    put(0x80 | ((cp >> 12) & 0x3F));
    put(0x80 | ((cp >> 6) & 0x3F));
    put(0x80 | (cp & 0x3F));
  }
}

bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(kLetterRanges, kLetterRangesCount, cp);
}

bool is_number(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(kNumberRanges, kNumberRangesCount, cp);
}

bool is_whitespace(uint32_t cp) {
  switch (cp) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

uint32_t byte_to_gpt2_char(uint8_t byte) {
  return gpt2_map().to_char[byte];
}

int gpt2_char_to_byte(uint32_t cp) {
  return cp < gpt2_map().to_byte.size() ? gpt2_map().to_byte[cp] : -1;
}

}  // namespace qalora::unicode
