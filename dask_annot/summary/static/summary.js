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
})();
