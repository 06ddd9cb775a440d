(function(){'use strict';
document.querySelectorAll('[data-tabs]').forEach(function(box){
  var buttons=box.querySelectorAll('.tabbar button');
  buttons.forEach(function(b){b.addEventListener('click',function(){
    buttons.forEach(function(o){o.setAttribute('aria-selected',o===b?'true':'false');
      var p=document.getElementById(o.getAttribute('data-tab'));if(p){p.hidden=(o!==b);}});
  });});
});
document.querySelectorAll('[data-hl]').forEach(function(box){
  function set(key){
    box.classList.toggle('hl-on',key!==null);
    box.querySelectorAll('[data-key]').forEach(function(el){el.classList.toggle('hl',key!==null&&el.getAttribute('data-key')===key);});
  }
  box.querySelectorAll('ul.legend li').forEach(function(li){
    li.addEventListener('mouseenter',function(){set(li.getAttribute('data-key'));});
    li.addEventListener('mouseleave',function(){set(null);});
  });
});
// tissue map: hovering a type in the legend shows that type alone (the others faded), drawn from the PNG's pixels
document.querySelectorAll('.tissuebox').forEach(function(box){
  var img=box.querySelector('img.tissue');
  if(!img){return;}
  var canvas=null, base=null;
  function show(colour){
    var m=/rgba?\((\d+),\s*(\d+),\s*(\d+)/.exec(colour);
    if(!m||!img.complete||!img.naturalWidth){return;}
    if(!canvas){
      canvas=document.createElement('canvas');
      canvas.width=img.naturalWidth; canvas.height=img.naturalHeight;
      canvas.className='tissue'; canvas.setAttribute('role','img');
      canvas.setAttribute('aria-label',img.getAttribute('alt')+', one type picked out');
      var c0=canvas.getContext('2d',{willReadFrequently:true}); c0.drawImage(img,0,0);
      base=c0.getImageData(0,0,canvas.width,canvas.height);
      img.parentNode.insertBefore(canvas,img.nextSibling);
    }
    var r=+m[1], g=+m[2], b=+m[3], src=base.data, out=new ImageData(base.width,base.height), d=out.data;
    for(var i=0;i<src.length;i+=4){
      if(src[i]===r&&src[i+1]===g&&src[i+2]===b){d[i]=r;d[i+1]=g;d[i+2]=b;}
      else{d[i]=(src[i]+765)>>2;d[i+1]=(src[i+1]+765)>>2;d[i+2]=(src[i+2]+765)>>2;}
      d[i+3]=255;
    }
    canvas.getContext('2d').putImageData(out,0,0);
    canvas.hidden=false; img.hidden=true;
  }
  function hide(){if(canvas){canvas.hidden=true;} img.hidden=false;}
  box.querySelectorAll('ul.legend li').forEach(function(li){
    li.addEventListener('mouseenter',function(){var dot=li.querySelector('.dot'); if(dot){show(getComputedStyle(dot).backgroundColor);}});
    li.addEventListener('mouseleave',hide);
  });
});
})();
