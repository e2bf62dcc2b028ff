// UTF-8 and the few Unicode properties the tokenizers need (letter, number, white space), plus
// the GPT-2 byte <-> printable-character map used by byte-level BPE vocabularies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qalora::unicode {

struct CodePointRange {
  uint32_t first, last;  // inclusive
};
// Generated tables (unicode_tables.cpp): general categories L* and N*.
extern const CodePointRange kLetterRanges[];
extern const size_t kLetterRangesCount;
extern const CodePointRange kNumberRanges[];
extern const size_t kNumberRangesCount;

// Marks a byte that is not part of a valid UTF-8 sequence: kInvalidBase + byte. It lies outside
// Unicode, so it is neither letter, number nor space, and the byte itself is kept.
constexpr uint32_t kInvalidBase = 0x110000;

struct CodePoint {
  uint32_t cp;
  uint32_t offset;  // byte offset in the source text
  uint32_t len;     // bytes, 1..4
};
// Decodes UTF-8; each byte of an ill-formed sequence becomes its own kInvalidBase + byte entry,
// so slicing the source by the returned offsets never loses or reorders a byte.
std::vector<CodePoint> decode_utf8(std::string_view text);
// Byte length of the well-formed sequence starting at text[pos], or 0 if ill-formed.
size_t utf8_sequence_length(std::string_view text, size_t pos);
void append_utf8(std::string& out, uint32_t cp);

bool is_letter(uint32_t cp);
bool is_number(uint32_t cp);
bool is_whitespace(uint32_t cp);  // the Unicode White_Space property

// GPT-2 byte-level BPE maps every byte to a printable code point (e.g. ' ' -> U+0120 'Ġ').
uint32_t byte_to_gpt2_char(uint8_t byte);
// The byte for a code point produced by byte_to_gpt2_char, or -1 for any other code point.
int gpt2_char_to_byte(uint32_t cp);

}  // namespace qalora::unicode
