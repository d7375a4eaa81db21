# Regenerates pillow-bilinear.json (expected outputs for pipeline.test.ts):
#   apt-get install -y python3-pil && /usr/bin/python3 pillow-bilinear.py > pillow-bilinear.json
import hashlib, json
from PIL import Image
import PIL
def src(h,w,c):
    n=h*w*c
    return bytes(((i*131 + ((i*i)>>3)) % 256) for i in range(n))
def run(h,w,c,oh,ow):
    mode={1:'L',3:'RGB'}[c]
    im=Image.frombytes(mode,(w,h),src(h,w,c))
    out=im.resize((ow,oh), Image.BILINEAR).tobytes()
    return out
res={'pillow':PIL.__version__}
for (h,w,c,oh,ow) in [(5,7,3,11,9),(32,32,3,13,10),(9,4,1,4,9),(6,6,1,6,15)]:
    res[f'{h}x{w}x{c}->{oh}x{ow}']=list(run(h,w,c,oh,ow))
for (h,w,c,oh,ow) in [(32,32,3,96,96),(28,28,1,96,96),(32,32,3,224,224),(28,28,1,32,32)]:
    o=run(h,w,c,oh,ow)
    res[f'{h}x{w}x{c}->{oh}x{ow}']={'sha256':hashlib.sha256(o).hexdigest(),'first':list(o[:12]),'sum':sum(o)}
print(json.dumps(res))
