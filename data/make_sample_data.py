"""Author the sample BELLE-format chat dataset that the tiny default trains on.

The conversations are written for lorapipe from the small fact tables below (arithmetic,
capitals, bilingual vocabulary, follow-up questions), in English and Chinese, single- and
multi-turn. They are regular enough that a tiny model's loss falls measurably in a few
hundred steps. Run it to regenerate data/belle_sample.json byte for byte:

    python data/make_sample_data.py > data/belle_sample.json
"""

import json
import random
import sys

COUNTRIES = [
    # (English name, capital, language, Chinese name, Chinese capital, Chinese language)
    ("France", "Paris", "French", "法国", "巴黎", "法语"),
    ("Germany", "Berlin", "German", "德国", "柏林", "德语"),
    ("Japan", "Tokyo", "Japanese", "日本", "东京", "日语"),
    ("China", "Beijing", "Chinese", "中国", "北京", "汉语"),
    ("Italy", "Rome", "Italian", "意大利", "罗马", "意大利语"),
    ("Spain", "Madrid", "Spanish", "西班牙", "马德里", "西班牙语"),
    ("Russia", "Moscow", "Russian", "俄罗斯", "莫斯科", "俄语"),
    ("Egypt", "Cairo", "Arabic", "埃及", "开罗", "阿拉伯语"),
    ("Brazil", "Brasilia", "Portuguese", "巴西", "巴西利亚", "葡萄牙语"),
    ("Canada", "Ottawa", "English and French", "加拿大", "渥太华", "英语和法语"),
    ("Australia", "Canberra", "English", "澳大利亚", "堪培拉", "英语"),
    ("India", "New Delhi", "Hindi and English", "印度", "新德里", "印地语和英语"),
    ("Mexico", "Mexico City", "Spanish", "墨西哥", "墨西哥城", "西班牙语"),
    ("Korea", "Seoul", "Korean", "韩国", "首尔", "韩语"),
    ("Thailand", "Bangkok", "Thai", "泰国", "曼谷", "泰语"),
    ("Greece", "Athens", "Greek", "希腊", "雅典", "希腊语"),
    ("Portugal", "Lisbon", "Portuguese", "葡萄牙", "里斯本", "葡萄牙语"),
    ("Kenya", "Nairobi", "Swahili and English", "肯尼亚", "内罗毕", "斯瓦希里语和英语"),
    ("Norway", "Oslo", "Norwegian", "挪威", "奥斯陆", "挪威语"),
    ("Sweden", "Stockholm", "Swedish", "瑞典", "斯德哥尔摩", "瑞典语"),
    ("Turkey", "Ankara", "Turkish", "土耳其", "安卡拉", "土耳其语"),
    ("Vietnam", "Hanoi", "Vietnamese", "越南", "河内", "越南语"),
    ("Argentina", "Buenos Aires", "Spanish", "阿根廷", "布宜诺斯艾利斯", "西班牙语"),
    ("Poland", "Warsaw", "Polish", "波兰", "华沙", "波兰语"),
]

WORDS = [
    # (English, Chinese, pinyin)
    ("apple", "苹果", "píngguǒ"), ("water", "水", "shuǐ"), ("book", "书", "shū"),
    ("cat", "猫", "māo"), ("dog", "狗", "gǒu"), ("tea", "茶", "chá"),
    ("mountain", "山", "shān"), ("river", "河", "hé"), ("friend", "朋友", "péngyou"),
    ("teacher", "老师", "lǎoshī"), ("school", "学校", "xuéxiào"), ("computer", "电脑", "diànnǎo"),
    ("moon", "月亮", "yuèliang"), ("sun", "太阳", "tàiyáng"), ("rain", "雨", "yǔ"),
    ("flower", "花", "huā"), ("train", "火车", "huǒchē"), ("rice", "米饭", "mǐfàn"),
    ("music", "音乐", "yīnyuè"), ("city", "城市", "chéngshì"), ("bird", "鸟", "niǎo"),
    ("tree", "树", "shù"), ("door", "门", "mén"), ("fish", "鱼", "yú"),
]

GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi, who are you?", "I am a small assistant fine-tuned with LoRA. Ask me a question."),
    ("Thank you.", "You are welcome. Is there anything else I can do for you?"),
    ("Good morning!", "Good morning! What would you like to know?"),
    ("你好！", "你好！有什么可以帮你的吗？"),
    ("你是谁？", "我是一个用 LoRA 微调的小助手，请问有什么问题？"),
    ("谢谢你。", "不客气，还有其他问题吗？"),
    ("早上好！", "早上好！今天想了解什么？"),
]


def arithmetic(rng, zh):
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    if rng.random() < 0.5:
        q = f"{a}加{b}等于多少？" if zh else f"What is {a} plus {b}?"
        r = f"{a}加{b}等于{a + b}。" if zh else f"{a} plus {b} is {a + b}."
        return [q, r], a + b
    a, b = max(a, b), min(a, b)
    q = f"{a}减{b}等于多少？" if zh else f"What is {a} minus {b}?"
    r = f"{a}减{b}等于{a - b}。" if zh else f"{a} minus {b} is {a - b}."
    return [q, r], a - b


def capital(country, zh):
    en, cap, _, zh_name, zh_cap, _ = country
    if zh:
        return [f"{zh_name}的首都是哪里？", f"{zh_name}的首都是{zh_cap}。"]
    return [f"What is the capital of {en}?", f"The capital of {en} is {cap}."]


def language_follow_up(country, zh):
    en, _, lang, zh_name, _, zh_lang = country
    if zh:
        return ["那里的人说什么语言？", f"{zh_name}的人主要说{zh_lang}。"]
    return ["And what language do people speak there?", f"People in {en} mainly speak {lang}."]


def translate(word, zh):
    en, han, pinyin = word
    if zh:
        return [f"“{han}”用英语怎么说？", f"“{han}”的英文是 {en}。"]
    return [f"How do you say '{en}' in Chinese?", f"'{en}' in Chinese is {han} ({pinyin})."]


def conversations(rng):
    """Yield lists of turns (human, gpt, human, gpt, ...)."""
    for zh in (False, True):
        for country in COUNTRIES:
            yield capital(country, zh)
            yield capital(country, zh) + language_follow_up(country, zh)
        for word in WORDS:
            yield translate(word, zh)
        for _ in range(60):
            yield arithmetic(rng, zh)[0]
        for _ in range(20):
            turns, total = arithmetic(rng, zh)
            double = ["再乘以2呢？", f"{total}乘以2等于{total * 2}。"] if zh else [
                "Now multiply that by 2.", f"{total} times 2 is {total * 2}."]
            yield turns + double
    for q, r in GREETINGS:
        yield [q, r]
    for i in range(0, len(WORDS) - 1, 2):
        yield translate(WORDS[i], False) + translate(WORDS[i + 1], True)


def main():
    rng = random.Random(20261128)
    convs = list(conversations(rng))
    rng.shuffle(convs)
    records = [
        {
            "id": f"lorapipe_sample_{i:04d}",
            "conversations": [
                {"from": "human" if j % 2 == 0 else "gpt", "value": v} for j, v in enumerate(turns)
            ],
        }
        for i, turns in enumerate(convs)
    ]
    json.dump(records, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
