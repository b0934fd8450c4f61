"""Words of the demo catalog: product kinds, attributes and brands in English, 汉字 and pinyin.

Pinyin is never written by hand here: it is derived from the Chinese with pypinyin, the same way
``blip_ops.text.normalize_text`` spells Chinese queries, so the three title languages agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    key: str  # render.py shape key
    category: str  # metadata column `category`
    en: tuple[str, ...]  # English names; the first is canonical, others are shopper synonyms
    zh: str
    materials: tuple[str, ...]  # plausible materials (keys of MATERIALS)
    extras_en: tuple[str, ...]  # marketplace filler: sizes, capacities, ages, features
    extras_zh: tuple[str, ...]
    price: float  # typical price; products vary around it


KINDS: tuple[Kind, ...] = (
    Kind(
        "sofa",
        "furniture",
        ("sofa", "couch"),
        "沙发",
        ("linen", "leather", "velvet", "cotton"),
        ("3 Seater", "Living Room", "Removable Cover"),
        ("三人位", "客厅", "可拆洗"),
        899,
    ),
    Kind(
        "armchair",
        "furniture",
        ("armchair", "accent chair"),
        "单人沙发椅",
        ("linen", "leather", "velvet", "wool"),
        ("Reading Chair", "Bedroom"),
        ("阅读椅", "卧室"),
        399,
    ),
    Kind(
        "dining_chair",
        "furniture",
        ("dining chair", "chair"),
        "餐椅",
        ("wood", "plastic", "leather", "velvet"),
        ("Set of 2", "Kitchen", "Ergonomic"),
        ("两把装", "厨房", "人体工学"),
        129,
    ),
    Kind(
        "coffee_table",
        "furniture",
        ("coffee table", "tea table"),
        "茶几",
        ("wood", "steel", "ceramic", "plastic"),
        ("Round", "Living Room", "Easy Assembly"),
        ("圆形", "客厅", "免安装"),
        259,
    ),
    Kind(
        "table_lamp",
        "lighting",
        ("table lamp", "desk lamp"),
        "台灯",
        ("ceramic", "steel", "linen", "plastic"),
        ("LED", "Eye Care", "Dimmable"),
        ("护眼", "可调光", "卧室床头"),
        89,
    ),
    Kind(
        "floor_lamp",
        "lighting",
        ("floor lamp", "standing lamp"),
        "落地灯",
        ("steel", "wood", "linen"),
        ("Living Room", "Remote Control"),
        ("客厅", "遥控"),
        199,
    ),
    Kind(
        "pillow",
        "home textile",
        ("throw pillow", "cushion"),
        "抱枕",
        ("cotton", "linen", "velvet", "wool"),
        ("45x45cm", "Sofa Cushion", "Cover Only"),
        ("45x45cm", "靠垫", "含芯"),
        39,
    ),
    Kind(
        "rug",
        "home textile",
        ("area rug", "carpet"),
        "地毯",
        ("wool", "cotton", "linen"),
        ("160x230cm", "Non-slip", "Bedroom"),
        ("160x230cm", "防滑", "卧室"),
        299,
    ),
    Kind(
        "vase",
        "home decor",
        ("vase", "flower vase"),
        "花瓶",
        ("ceramic", "plastic", "steel"),
        ("Nordic Decor", "Tabletop"),
        ("北欧装饰", "摆件"),
        59,
    ),
    Kind(
        "wall_clock",
        "home decor",
        ("wall clock", "clock"),
        "挂钟",
        ("wood", "steel", "plastic"),
        ("Silent", "12 inch"),
        ("静音", "12英寸"),
        79,
    ),
    Kind(
        "handbag",
        "bags",
        ("handbag", "tote bag"),
        "手提包",
        ("leather", "cotton", "linen", "velvet"),
        ("Women", "Large Capacity", "Shoulder"),
        ("女士", "大容量", "单肩"),
        299,
    ),
    Kind(
        "backpack",
        "bags",
        ("backpack", "school bag"),
        "双肩包",
        ("cotton", "leather", "plastic"),
        ("Laptop 15.6 inch", "Waterproof", "Travel"),
        ("15.6寸电脑", "防水", "旅行"),
        159,
    ),
    Kind(
        "suitcase",
        "bags",
        ("suitcase", "luggage"),
        "行李箱",
        ("plastic", "steel", "leather"),
        ("20 inch", "Spinner Wheels", "TSA Lock"),
        ("20寸", "万向轮", "密码锁"),
        459,
    ),
    Kind(
        "wallet",
        "bags",
        ("wallet", "purse"),
        "钱包",
        ("leather", "cotton"),
        ("Men", "Card Holder", "Slim"),
        ("男士", "卡包", "超薄"),
        99,
    ),
    Kind(
        "sneaker",
        "shoes",
        ("sneakers", "running shoes"),
        "运动鞋",
        ("cotton", "leather", "plastic"),
        ("Men", "Breathable", "Size 42"),
        ("男款", "透气", "42码"),
        259,
    ),
    Kind(
        "boot",
        "shoes",
        ("boots", "ankle boots"),
        "短靴",
        ("leather", "velvet", "wool"),
        ("Women", "Winter", "Size 38"),
        ("女款", "冬季", "38码"),
        329,
    ),
    Kind(
        "tshirt",
        "clothing",
        ("t-shirt", "tee"),
        "T恤",
        ("cotton", "linen"),
        ("Men", "Short Sleeve", "Size XL"),
        ("男士", "短袖", "XL码"),
        69,
    ),
    Kind(
        "dress",
        "clothing",
        ("dress", "midi dress"),
        "连衣裙",
        ("cotton", "linen", "velvet"),
        ("Women", "Summer", "A-line"),
        ("女士", "夏季", "A字裙"),
        199,
    ),
    Kind(
        "hoodie",
        "clothing",
        ("hoodie", "sweatshirt"),
        "连帽卫衣",
        ("cotton", "wool", "velvet"),
        ("Unisex", "Oversize", "Autumn"),
        ("男女同款", "宽松", "秋季"),
        159,
    ),
    Kind(
        "cap",
        "clothing",
        ("baseball cap", "cap"),
        "棒球帽",
        ("cotton", "wool", "leather"),
        ("Adjustable", "Sun Protection"),
        ("可调节", "防晒"),
        49,
    ),
    Kind(
        "mug",
        "kitchen",
        ("mug", "coffee cup"),
        "马克杯",
        ("ceramic", "steel", "plastic"),
        ("350ml", "With Lid", "Gift"),
        ("350ml", "带盖", "礼物"),
        39,
    ),
    Kind(
        "kettle",
        "kitchen",
        ("electric kettle", "kettle"),
        "电热水壶",
        ("steel", "plastic", "ceramic"),
        ("1.7L", "Auto Shut-off", "Fast Boil"),
        ("1.7L", "自动断电", "快煮"),
        129,
    ),
    Kind(
        "teapot",
        "kitchen",
        ("teapot", "tea kettle"),
        "茶壶",
        ("ceramic", "steel"),
        ("800ml", "With Infuser"),
        ("800ml", "带滤网"),
        89,
    ),
    Kind(
        "water_bottle",
        "kitchen",
        ("water bottle", "tumbler"),
        "保温杯",
        ("steel", "plastic"),
        ("500ml", "Vacuum Insulated", "Leak-proof"),
        ("500ml", "真空保温", "防漏"),
        79,
    ),
    Kind(
        "bowl",
        "kitchen",
        ("bowl", "salad bowl"),
        "碗",
        ("ceramic", "wood", "plastic"),
        ("Set of 4", "Microwave Safe"),
        ("四只装", "可微波"),
        49,
    ),
    Kind(
        "watch",
        "accessories",
        ("watch", "wrist watch"),
        "手表",
        ("steel", "leather", "plastic"),
        ("Men", "Waterproof", "Quartz"),
        ("男士", "防水", "石英"),
        399,
    ),
    Kind(
        "headphones",
        "electronics",
        ("headphones", "headset"),
        "头戴式耳机",
        ("plastic", "leather", "steel"),
        ("Wireless", "Noise Cancelling", "Bluetooth 5.3"),
        ("无线", "降噪", "蓝牙5.3"),
        299,
    ),
    Kind(
        "phone_case",
        "electronics",
        ("phone case", "phone cover"),
        "手机壳",
        ("plastic", "leather", "cotton"),
        ("Shockproof", "for iPhone 15"),
        ("防摔", "适用iPhone15"),
        29,
    ),
    Kind(
        "kids_scooter",
        "toys",
        ("kids scooter", "balance scooter"),
        "儿童滑行车",
        ("plastic", "steel"),
        ("1-3 Years", "Anti-rollover", "Flashing Wheels"),
        ("1-3岁", "防侧翻", "闪光轮"),
        159,
    ),
    Kind(
        "toy_car",
        "toys",
        ("toy car", "ride-on car"),
        "玩具车",
        ("plastic", "steel", "wood"),
        ("Kids", "Pull Back", "3+ Years"),
        ("儿童", "回力", "3岁以上"),
        59,
    ),
    Kind(
        "teddy_bear",
        "toys",
        ("teddy bear", "plush toy"),
        "泰迪熊",
        ("velvet", "wool", "cotton"),
        ("40cm", "Gift for Girls"),
        ("40cm", "女孩礼物"),
        89,
    ),
    Kind(
        "umbrella",
        "accessories",
        ("umbrella", "folding umbrella"),
        "雨伞",
        ("cotton", "plastic"),
        ("Windproof", "UV Protection", "Automatic"),
        ("防风", "防晒", "全自动"),
        69,
    ),
)
KIND_BY_KEY = {k.key: k for k in KINDS}

# name -> (RGB, 汉字). Picked far apart in RGB so a colour variant is always visible.
COLORS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((200, 30, 40), "红色"),
    "blue": ((35, 90, 200), "蓝色"),
    "green": ((40, 150, 70), "绿色"),
    "yellow": ((240, 200, 40), "黄色"),
    "orange": ((240, 120, 30), "橙色"),
    "pink": ((240, 150, 180), "粉色"),
    "purple": ((120, 60, 160), "紫色"),
    "black": ((30, 30, 30), "黑色"),
    "white": ((235, 235, 230), "白色"),
    "grey": ((128, 128, 128), "灰色"),
    "brown": ((120, 75, 35), "棕色"),
    "beige": ((215, 195, 160), "米色"),
    "navy": ((25, 35, 90), "藏青色"),
    "teal": ((30, 140, 140), "青色"),
}

# key -> (English words, 汉字); English may be empty for "solid".
PATTERNS: dict[str, tuple[str, str]] = {
    "solid": ("solid", "纯色"),
    "striped": ("striped", "条纹"),
    "dotted": ("polka dot", "波点"),
    "plaid": ("plaid", "格子"),
    "floral": ("floral", "碎花"),
}

MATERIALS: dict[str, tuple[str, str, float]] = {  # key -> (English, 汉字, price factor)
    "cotton": ("cotton", "纯棉", 1.0),
    "linen": ("linen", "亚麻", 1.1),
    "leather": ("genuine leather", "真皮", 1.8),
    "velvet": ("velvet", "丝绒", 1.3),
    "wool": ("wool", "羊毛", 1.5),
    "wood": ("solid wood", "实木", 1.4),
    "steel": ("stainless steel", "不锈钢", 1.2),
    "plastic": ("plastic", "塑料", 0.7),
    "ceramic": ("ceramic", "陶瓷", 1.0),
}


@dataclass(frozen=True)
class Brand:
    en: str  # as printed in English listings and on Latin-only labels
    zh: str  # as written in Chinese listings
    label: str  # what is printed on the product


BRANDS: tuple[Brand, ...] = (
    Brand("M & D", "M&D", "M & D"),
    Brand("UPIN", "优品", "优品 UPIN"),
    Brand("Nordika", "诺迪卡", "NORDIKA"),
    Brand("HOMEY", "家悦", "家悦 HOMEY"),
    Brand("Kido", "小童", "KIDO"),
    Brand("Luxe&Co", "露诗", "LUXE&CO 露诗"),
    Brand("Zenith", "泽尼斯", "ZENITH"),
    Brand("Mujia", "木集", "木集"),
    Brand("Aurora", "极光", "AURORA 极光"),
    Brand("Panda Home", "熊猫家居", "PANDA"),
    Brand("Tianli", "天丽", "天丽 TIANLI"),
    Brand("Orbit", "奥比特", "ORBIT"),
)

STYLES: tuple[tuple[str, str], ...] = (
    ("Simple Modern", "简约现代"),
    ("Light Luxury", "轻奢"),
    ("Nordic Style", "北欧风"),
    ("Vintage", "复古"),
    ("Minimalist", "极简"),
    ("Japanese Style", "日式"),
    ("Korean Style", "韩版"),
    ("Classic", "经典"),
)

MARKETING: tuple[tuple[str, str], ...] = (
    ("Hot Sale", "热销"),
    ("2026 New", "2026新款"),
    ("Free Shipping", "包邮"),
    ("Official Store", "官方旗舰店"),
    ("Limited Offer", "限时特惠"),
    ("Best Seller", "爆款"),
    ("Premium Quality", "品质保证"),
    ("Genuine", "正品"),
)
