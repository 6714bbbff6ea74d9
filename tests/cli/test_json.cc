// The CLI's JSON writer (client/cli_json.h): escaping, UTF-8, numbers,
// nesting; every output is checked with an independent strict parser, and
// once with python3's json module.
#include <gtest/gtest.h>

#include <cstdio>
#include <random>

#include "cli_json.h"
#include "cli_test_util.h"
#include "json_parse.h"

namespace nbdsnap {
namespace {

using json::parse_json;

std::string quote_json(std::string_view s) {
  std::string out;
  json_quote(s, &out);
  return out;
}

TEST(JsonWriter, WritesScalars) {
  EXPECT_EQ(Json().dump(), "null");
  EXPECT_EQ(Json(nullptr).dump(), "null");
  EXPECT_EQ(Json(true).dump(), "true");
  EXPECT_EQ(Json(false).dump(), "false");
  EXPECT_EQ(Json(0).dump(), "0");
  EXPECT_EQ(Json(-42).dump(), "-42");
  EXPECT_EQ(Json(INT64_MIN).dump(), "-9223372036854775808");
  EXPECT_EQ(Json(UINT64_MAX).dump(), "18446744073709551615");
  EXPECT_EQ(Json(static_cast<uint32_t>(7)).dump(), "7");
  EXPECT_EQ(Json("text").dump(), "\"text\"");
  EXPECT_EQ(Json(std::string("s")).dump(), "\"s\"");
}

TEST(JsonWriter, EscapesQuotesBackslashesAndControlCharacters) {
  EXPECT_EQ(quote_json("a\"b\\c"), R"("a\"b\\c")");
  EXPECT_EQ(quote_json("\n\r\t\b\f"), R"("\n\r\t\b\f")");
  EXPECT_EQ(quote_json(std::string("\x01\x1f", 2)), R"("\u0001\u001f")");
  EXPECT_EQ(quote_json(std::string("a\0b", 3)), R"("a\u0000b")");
  EXPECT_EQ(quote_json("/ and \x7f pass"), "\"/ and \x7f pass\"");
}

TEST(JsonWriter, PassesValidUtf8Through) {
  std::string s = "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF";  // é € 😀 U+10FFFF
  EXPECT_EQ(quote_json(s), "\"" + s + "\"");
}

TEST(JsonWriter, ReplacesEachByteOfInvalidUtf8WithReplacementCharacter) {
  const std::string fffd = "\xEF\xBF\xBD";
  EXPECT_EQ(quote_json("a\xFF" "b"), "\"a" + fffd + "b\"");
  EXPECT_EQ(quote_json("\xC0\x80"), "\"" + fffd + fffd + "\"");            // overlong NUL
  EXPECT_EQ(quote_json("\xE2\x82"), "\"" + fffd + fffd + "\"");            // truncated at the end
  EXPECT_EQ(quote_json("\xED\xA0\x80"), "\"" + fffd + fffd + fffd + "\"");  // UTF-16 surrogate
  EXPECT_EQ(quote_json("\xF4\x90\x80\x80"), "\"" + fffd + fffd + fffd + fffd + "\"");  // above U+10FFFF
  EXPECT_EQ(quote_json("\x80x"), "\"" + fffd + "x\"");                     // lone continuation byte
}

TEST(JsonWriter, KeepsMemberOrderAndReplacesARepeatedKey) {
  Json o = Json::object({{"b", 1}, {"a", "x"}});
  o.set("c", Json::array({1, "two", nullptr, true}));
  o.set("b", 2);
  EXPECT_EQ(o.dump(), R"({"b":2,"a":"x","c":[1,"two",null,true]})");
  EXPECT_EQ(Json::object().dump(), "{}");
  EXPECT_EQ(Json::array().dump(), "[]");
  std::vector<uint32_t> v = {3, 1, 2};
  EXPECT_EQ(Json::array_of(v).dump(), "[3,1,2]");
  EXPECT_EQ(Json::object({{"x", Json::object({{"y", Json::array()}})}}).dump(), R"({"x":{"y":[]}})");
}

TEST(JsonWriter, RandomStringsRoundTripThroughAStrictParser) {
  unsigned seed = std::random_device{}();
  if (const char* s = std::getenv("NBDSNAP_SEED")) seed = static_cast<unsigned>(std::strtoul(s, nullptr, 10));
  SCOPED_TRACE("NBDSNAP_SEED=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const std::vector<std::string> pieces = {"a", "\"", "\\", "\n", std::string(1, '\0'), "\x1b", "\xC3\xA9",
                                           "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xFF", "\xC0", "\x80", "/", " "};
  for (int round = 0; round < 2000; ++round) {
    std::string s;
    bool valid = true;
    int n = static_cast<int>(rng() % 12);
    for (int k = 0; k < n; ++k) {
      const std::string& p = pieces[rng() % pieces.size()];
      valid &= p != "\xFF" && p != "\xC0" && p != "\x80";
      s += p;
    }
    std::string text = Json::object({{"k", s}}).dump();
    std::string err;
    auto v = parse_json(text, &err);
    ASSERT_TRUE(v) << err << " in " << text;
    // Valid strings come back unchanged (inserting an invalid piece may
    // complete a sequence only if it is itself valid, which these are not).
    if (valid) {
      EXPECT_EQ((*v)["k"].str(), s) << text;
    }
  }
}

TEST(JsonWriter, PythonJsonModuleDecodesTheOutput) {
  if (std::system("python3 -c 'import json' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no python3";
  test::TempDir tmp;
  std::string s = std::string("q\"b\\n\n\t\x01\0", 9) + "\xC3\xA9\xF0\x9F\x98\x80" + "\xFF";
  Json doc = Json::object({{"s", s},
                           {"n", UINT64_MAX},
                           {"neg", INT64_MIN},
                           {"a", Json::array({Json::array({0, 4096}), nullptr, false})},
                           {"o", Json::object()}});
  std::string path = tmp / "doc.json";
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_TRUE(f);
    std::string text = doc.dump() + "\n";
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  std::string script =
      "import json,sys\n"
      "d=json.loads(open(sys.argv[1],'rb').read().decode('utf-8'))\n"
      "assert d['n']==18446744073709551615 and d['neg']==-9223372036854775808\n"
      "assert d['a']==[[0,4096],None,False] and d['o']=={}\n"
      "print(d['s'].encode('utf-8').hex())\n";
  std::string script_path = tmp / "check.py";
  {
    std::FILE* f = std::fopen(script_path.c_str(), "w");
    ASSERT_TRUE(f);
    std::fputs(script.c_str(), f);
    std::fclose(f);
  }
  auto r = test::run_tool("/bin/sh", {"-c", "exec python3 \"$0\" \"$1\"", script_path, path});
  ASSERT_EQ(r.exit_code, 0) << test::describe(r);
  std::string expected;
  std::string decoded = s.substr(0, s.size() - 1) + "\xEF\xBF\xBD";  // the invalid byte became U+FFFD
  for (unsigned char c : decoded) {
    char buf[3];
    std::snprintf(buf, sizeof buf, "%02x", c);
    expected += buf;
  }
  EXPECT_EQ(r.out, expected + "\n");
}

TEST(JsonParserUnderTest, RejectsWhatIsNotJson) {
  // The checks above are only as good as the parser: make sure it is strict.
  std::string err;
  for (const char* bad : {"", "{", "{\"a\":1,}", "[1,]", "{\"a\":1,\"a\":2}", "\"\x01\"", "\"\xFF\"", "01",
                          "1.", "nul", "{} {}", "\"\\ud800\"", "\"\\x\""})
    EXPECT_FALSE(parse_json(bad, &err)) << bad;
  auto v = parse_json(R"( {"a":[1,-2,3.5e1],"b":"\u00e9\ud83d\ude00"} )", &err);
  ASSERT_TRUE(v) << err;
  EXPECT_EQ((*v)["a"][1].i64(), -2);
  EXPECT_EQ((*v)["b"].str(), "\xC3\xA9\xF0\x9F\x98\x80");
}

}  // namespace
}  // namespace nbdsnap
