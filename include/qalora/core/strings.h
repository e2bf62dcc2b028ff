// Small text helpers shared by the parsers.
#pragma once

#include <string_view>

namespace qalora {

// `s` without the ASCII spaces, tabs, carriage returns and line feeds at either end.
std::string_view trim(std::string_view s);

}  // namespace qalora
