// A strict JSON parser (RFC 8259), for backup manifests and the CLI tests
// (independent of the writer, cli_json.h): one value plus whitespace, no trailing commas, no
// duplicate keys, strings must be valid UTF-8 without raw control
// characters; \u escapes (with surrogate pairs) are decoded to UTF-8.
// Header-only; plain values, no shared state.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace nbdsnap::json {

struct JValue {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool b = false;
  std::string text;  // kNumber: the literal; kString: the decoded string
  std::vector<JValue> items;
  std::vector<std::pair<std::string, JValue>> members;

  bool is_null() const { return kind == Kind::kNull; }
  bool is_string() const { return kind == Kind::kString; }
  bool is_number() const { return kind == Kind::kNumber; }
  bool is_array() const { return kind == Kind::kArray; }
  bool is_object() const { return kind == Kind::kObject; }
  bool has(std::string_view key) const {
    for (const auto& m : members)
      if (m.first == key) return true;
    return false;
  }
  // A missing key or index yields a null value.
  const JValue& operator[](std::string_view key) const {
    for (const auto& m : members)
      if (m.first == key) return m.second;
    return null_value();
  }
  const JValue& operator[](size_t i) const { return i < items.size() ? items[i] : null_value(); }
  size_t size() const { return kind == Kind::kArray ? items.size() : members.size(); }
  const std::string& str() const { return text; }
  // The number as an unsigned integer (0 if it is not one).
  uint64_t u64() const {
    if (kind != Kind::kNumber || text.empty() || text[0] == '-') return 0;
    uint64_t v = 0;
    for (char c : text) {
      if (c < '0' || c > '9') return 0;
      v = v * 10 + static_cast<uint64_t>(c - '0');
    }
    return v;
  }
  int64_t i64() const {
    if (kind == Kind::kNumber && !text.empty() && text[0] == '-') {
      JValue pos = *this;
      pos.text = text.substr(1);
      return -static_cast<int64_t>(pos.u64());
    }
    return static_cast<int64_t>(u64());
  }
  std::vector<std::string> keys() const {
    std::vector<std::string> k;
    for (const auto& m : members) k.push_back(m.first);
    return k;
  }

  static const JValue& null_value() {
    static const JValue n;
    return n;
  }
};

class JsonParser {
 public:
  explicit JsonParser(std::string_view s) : s_(s) {}

  std::optional<JValue> parse(std::string* error) {
    JValue v;
    ws();
    if (!value(&v, 0)) {
      *error = err_ + " at offset " + std::to_string(pos_);
      return std::nullopt;
    }
    ws();
    if (pos_ != s_.size()) {
      *error = "trailing characters at offset " + std::to_string(pos_);
      return std::nullopt;
    }
    return v;
  }

 private:
  bool fail(const char* m) {
    if (err_.empty()) err_ = m;
    return false;
  }
  void ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  bool lit(std::string_view w) {
    if (s_.substr(pos_, w.size()) != w) return fail("bad literal");
    pos_ += w.size();
    return true;
  }
  bool value(JValue* v, int depth) {
    if (depth > 64) return fail("too deep");
    if (pos_ >= s_.size()) return fail("unexpected end");
    char c = s_[pos_];
    if (c == '{') return object(v, depth);
    if (c == '[') return array(v, depth);
    if (c == '"') {
      v->kind = JValue::Kind::kString;
      return string(&v->text);
    }
    if (c == 't') { v->kind = JValue::Kind::kBool; v->b = true; return lit("true"); }
    if (c == 'f') { v->kind = JValue::Kind::kBool; return lit("false"); }
    if (c == 'n') return lit("null");
    return number(v);
  }
  bool number(JValue* v) {
    size_t start = pos_;
    auto digit = [&] { return pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9'; };
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    if (!digit()) return fail("bad number");
    if (s_[pos_] == '0') ++pos_;
    else while (digit()) ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (!digit()) return fail("bad fraction");
      while (digit()) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (!digit()) return fail("bad exponent");
      while (digit()) ++pos_;
    }
    v->kind = JValue::Kind::kNumber;
    v->text = std::string(s_.substr(start, pos_ - start));
    return true;
  }
  static void put_utf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  bool hex4(uint32_t* out) {
    if (pos_ + 4 > s_.size()) return fail("short \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else return fail("bad \\u escape");
    }
    *out = v;
    return true;
  }
  // Length of a valid UTF-8 sequence at pos_, 0 if invalid.
  size_t utf8_len() const {
    auto b = [&](size_t k) { return k < s_.size() ? static_cast<unsigned char>(s_[k]) : 0; };
    auto cont = [&](size_t k) { return (b(k) & 0xC0) == 0x80; };
    unsigned char c = b(pos_);
    if (c >= 0xC2 && c <= 0xDF) return cont(pos_ + 1) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
      if (!cont(pos_ + 1) || !cont(pos_ + 2)) return 0;
      if (c == 0xE0 && b(pos_ + 1) < 0xA0) return 0;
      if (c == 0xED && b(pos_ + 1) > 0x9F) return 0;
      return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
      if (!cont(pos_ + 1) || !cont(pos_ + 2) || !cont(pos_ + 3)) return 0;
      if (c == 0xF0 && b(pos_ + 1) < 0x90) return 0;
      if (c == 0xF4 && b(pos_ + 1) > 0x8F) return 0;
      return 4;
    }
    return 0;
  }
  bool string(std::string* out) {
    ++pos_;  // opening quote
    for (;;) {
      if (pos_ >= s_.size()) return fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return true;
      }
      if (c < 0x20) return fail("raw control character in string");
      if (c >= 0x80) {
        size_t n = utf8_len();
        if (n == 0) return fail("invalid UTF-8 in string");
        out->append(s_.substr(pos_, n));
        pos_ += n;
        continue;
      }
      if (c != '\\') {
        out->push_back(static_cast<char>(c));
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= s_.size()) return fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp;
          if (!hex4(&cp)) return false;
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            uint32_t lo;
            if (s_.substr(pos_, 2) != "\\u") return fail("lone high surrogate");
            pos_ += 2;
            if (!hex4(&lo)) return false;
            if (lo < 0xDC00 || lo > 0xDFFF) return fail("bad low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return fail("lone low surrogate");
          }
          put_utf8(cp, out);
          break;
        }
        default: return fail("bad escape");
      }
    }
  }
  bool array(JValue* v, int depth) {
    v->kind = JValue::Kind::kArray;
    ++pos_;
    ws();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      return true;
    }
    for (;;) {
      JValue item;
      ws();
      if (!value(&item, depth + 1)) return false;
      v->items.push_back(std::move(item));
      ws();
      if (pos_ >= s_.size()) return fail("unterminated array");
      if (s_[pos_] == ',') { ++pos_; continue; }
      if (s_[pos_] == ']') { ++pos_; return true; }
      return fail("expected , or ]");
    }
  }
  bool object(JValue* v, int depth) {
    v->kind = JValue::Kind::kObject;
    ++pos_;
    ws();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      return true;
    }
    for (;;) {
      ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') return fail("expected a key");
      std::string key;
      if (!string(&key)) return false;
      if (v->has(key)) return fail("duplicate key");
      ws();
      if (pos_ >= s_.size() || s_[pos_] != ':') return fail("expected :");
      ++pos_;
      ws();
      JValue item;
      if (!value(&item, depth + 1)) return false;
      v->members.emplace_back(std::move(key), std::move(item));
      ws();
      if (pos_ >= s_.size()) return fail("unterminated object");
      if (s_[pos_] == ',') { ++pos_; continue; }
      if (s_[pos_] == '}') { ++pos_; return true; }
      return fail("expected , or }");
    }
  }

  std::string_view s_;
  size_t pos_ = 0;
  std::string err_;
};

inline std::optional<JValue> parse_json(std::string_view text, std::string* error) {
  return JsonParser(text).parse(error);
}

}  // namespace nbdsnap::json
