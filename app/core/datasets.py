"""Class names and display colours of the data sets the BiSeNet family is trained on."""

import colorsys

CITYSCAPES = [
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)), ("fence", (190, 153, 153)), ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)), ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)), ("sky", (70, 130, 180)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)), ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)), ("bicycle", (119, 11, 32)),
]

CAMVID = [
    ("sky", (128, 128, 128)), ("building", (128, 0, 0)), ("pole", (192, 192, 128)), ("road", (128, 64, 128)),
    ("sidewalk", (60, 40, 222)), ("tree", (128, 128, 0)), ("sign", (192, 128, 128)), ("fence", (64, 64, 128)),
    ("car", (64, 0, 128)), ("pedestrian", (64, 64, 0)), ("bicyclist", (0, 128, 192)),
]

COCO_STUFF_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other "
    "ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble "
    "floor-other floor-stone floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel "
    "ground-other hill house leaves light mat metal mirror-stuff moss mountain mud napkin net paper pavement "
    "pillow plant-other plastic platform playingfield railing railroad river road rock roof rug salad sand sea "
    "shelf sky-other skyscraper snow solid-other stairs stone straw structural-other table tent textile-other "
    "towel tree vegetable wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood "
    "water-other waterdrops window-blind window-other wood"
).split()
COCO_STUFF_NAMES = [n.replace("_", " ") for n in COCO_STUFF_NAMES]

ADE20K_NAMES = [n.strip() for n in (
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,door,table,"
    "mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,field,armchair,seat,fence,"
    "desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,chest of drawers,counter,sand,"
    "sink,skyscraper,fireplace,refrigerator,grandstand,path,stairs,runway,case,pool table,pillow,screen door,"
    "stairway,river,bridge,bookcase,blind,coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,"
    "kitchen island,computer,swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,tower,chandelier,"
    "awning,streetlight,booth,television receiver,airplane,dirt track,apparel,pole,land,bannister,escalator,"
    "ottoman,bottle,buffet,poster,stage,van,ship,fountain,conveyer belt,canopy,washer,plaything,swimming pool,"
    "stool,barrel,basket,waterfall,tent,bag,minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,"
    "animal,bicycle,lake,dishwasher,screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,"
    "pier,crt screen,plate,monitor,bulletin board,shower,radiator,glass,clock,flag"
).split(",")]


# The colour of a class id a model outputs beyond its classes (a model and its metadata that disagree): one fixed,
# loud colour, named "unknown (id N)", rather than a crash or a colour borrowed from another class.
UNKNOWN_COLOUR = (255, 0, 255)


def serving_palette(palette: list, num_classes: int) -> list[tuple[int, int, int]]:
    """The palette a model is served with: a colour for each of its ``num_classes`` classes (named ones first,
    generated ones after), then :data:`UNKNOWN_COLOUR` up to 256 rows (any uint8 id indexes it) or, past 256
    classes, one row more (the row wider ids are clamped to)."""
    colours = list(palette[:num_classes])
    colours += generated_palette(num_classes)[len(colours):]
    return colours + [UNKNOWN_COLOUR] * (max(256, num_classes + 1) - num_classes)


def generated_palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated colours (golden-ratio hue steps), for class sets without published colours."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.55 + 0.45 * ((i * 7) % 3) / 2, 0.95 - 0.35 * ((i * 5) % 4) / 3)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


# name -> (class names, palette, mean, std); mean/std are the pre-processing the checkpoints were trained with.
DATASETS = {
    "cityscapes": ([n for n, _ in CITYSCAPES], [c for _, c in CITYSCAPES],
                   (0.3257, 0.3690, 0.3223), (0.2112, 0.2148, 0.2115)),
    "coco": (COCO_STUFF_NAMES, generated_palette(len(COCO_STUFF_NAMES)),
             (0.46962251, 0.4464104, 0.40718787), (0.27469736, 0.27012361, 0.28515933)),
    "ade20k": (ADE20K_NAMES, generated_palette(len(ADE20K_NAMES)),
               (0.49343230, 0.46819794, 0.43106043), (0.25680755, 0.25506608, 0.27422913)),
    # CamVid mean/std: computed on the 367 training images (app.bisenet.data.channel_stats).
    "camvid": ([n for n, _ in CAMVID], [c for _, c in CAMVID], (0.4116, 0.4250, 0.4322), (0.3068, 0.3112, 0.3069)),
}
assert len(COCO_STUFF_NAMES) == 171 and len(ADE20K_NAMES) == 150
